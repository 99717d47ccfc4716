"""benchmarks/compare_hf.py without torch: its options, the two-process plumbing of --backend both,
and the pjllm side end to end with a profiled timed run (CPU). The hf side is in test_hf_backend.py."""

import importlib.util
import json

import pytest

from benchmarks import compare_hf

MODEL = ["--model", "tests/golden/llama3/config.json", "--load-format", "dummy"]
SMALL_ENGINE = ["--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--compilation-cache-dir", "none"]
HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_subcommands_take_the_bench_options_and_the_hf_ones():
    args = compare_hf.build_parser().parse_args([
        "throughput", *MODEL, "--dataset", "chat", "--num-prompts", "5", "--max-num-seqs", "8",
        "--hf-cb-config", '{"max_batch_tokens": 4096}', "--profile-dir", "trace"])
    assert (args.bench_command, args.dataset, args.num_prompts) == ("throughput", "chat", 5)
    assert args.backend == "both" and args.hf_cb_config == {"max_batch_tokens": 4096}
    assert args.profile_dir == "trace" and args.warmup == "blocking"
    args = compare_hf.build_parser().parse_args(["latency", *MODEL, "--batch-sizes", "1,8", "--backend", "hf"])
    assert args.batch_sizes == [1, 8] and args.backend == "hf" and args.hf_attn_implementation is None
    args = compare_hf.build_parser().parse_args(["startup", *MODEL, "--backend", "pjllm"])
    assert args.warmup == "auto" and not hasattr(args, "profile_dir")


def test_child_argv_replaces_backend_and_output():
    argv = ["throughput", "--backend", "both", "--num-prompts", "3", "--output-json=out.json"]
    assert compare_hf.child_argv(argv, "hf", "/tmp/hf.json") == [
        "throughput", "--num-prompts", "3", "--backend", "hf", "--output-json", "/tmp/hf.json"]


def _both(monkeypatch, make_record):
    """--backend both with the two child processes replaced by their records."""
    monkeypatch.setattr(compare_hf, "require_torch", lambda: None)
    monkeypatch.setattr(compare_hf, "run_sides_in_children", lambda args: [
        {"results": [make_record("pjllm")]}, {"results": [make_record("hf")]}])


def test_throughput_both_merges_the_sides_and_prints_their_ratio(monkeypatch, tmp_path, capsys):
    def record(backend):
        return {"backend": backend, "dataset": "chat", "num_prompts": 4, "model": "m",
                "workload_digest": "abc", "elapsed_s": 1.0, "requests_per_s": 4.0,
                "total_tokens_per_s": 100.0, "output_tokens_per_s": 50.0 if backend == "pjllm" else 10.0}

    _both(monkeypatch, record)
    out = tmp_path / "both.json"
    assert compare_hf.main(["throughput", "--output-json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [r["backend"] for r in payload["results"]] == ["pjllm", "hf"]
    assert payload["ratios"]["pjllm_over_hf"]["output_tokens_per_s"] == pytest.approx(5.0)
    assert "pjllm / hf" in capsys.readouterr().out


def test_throughput_both_refuses_different_workloads(monkeypatch):
    _both(monkeypatch, lambda backend: {"backend": backend, "dataset": "chat", "num_prompts": 4, "model": "m",
                                        "workload_digest": backend, "elapsed_s": 1.0, "requests_per_s": 1.0,
                                        "total_tokens_per_s": 1.0, "output_tokens_per_s": 1.0})
    with pytest.raises(RuntimeError, match="different workloads"):
        compare_hf.main(["throughput"])


def test_latency_both_has_a_ratio_per_batch_size(monkeypatch, tmp_path):
    def record(backend):
        scale = 1.0 if backend == "pjllm" else 4.0
        return {"backend": backend, "input_len": 8, "output_len": 4, "model": "m",
                "rows": [{"batch_size": b, "ttft_ms": 2.0 * scale, "tpot_ms": 1.0 * scale,
                          "e2e_ms": 5.0 * scale} for b in (1, 8)]}

    _both(monkeypatch, record)
    out = tmp_path / "latency.json"
    assert compare_hf.main(["latency", "--batch-sizes", "1,8", "--output-json", str(out)]) == 0
    ratios = json.loads(out.read_text())["ratios"]["pjllm_over_hf"]
    assert [r["batch_size"] for r in ratios] == [1, 8]
    assert ratios[0]["tpot_ms"] == pytest.approx(0.25)


@pytest.mark.skipif(HAS_TORCH, reason="torch is installed")
def test_hf_side_without_torch_says_how_to_get_it(capsys):
    assert compare_hf.main(["latency", *MODEL, "--backend", "hf"]) == 2
    assert "pip install torch" in capsys.readouterr().err


def test_pjllm_side_with_a_profiled_timed_run(tmp_path):
    out = tmp_path / "t.json"
    assert compare_hf.main(["throughput", *MODEL, *SMALL_ENGINE, "--backend", "pjllm", "--dataset", "random",
                            "--num-prompts", "4", "--input-len", "12", "--output-len", "5",
                            "--num-warmup-prompts", "1", "--profile-dir", str(tmp_path / "trace"),
                            "--output-json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert "ratios" not in payload
    (record,) = payload["results"]
    assert record["backend"] == "pjllm" and record["total_output_tokens"] == 4 * 5
    device_time = record["device_time_s"]  # from the JAX profiler trace of the timed run
    assert {"attention", "matmul", "copy", "other", "total", "idle"} <= set(device_time)
    assert device_time["total"] > 0
    assert list((tmp_path / "trace" / "pjllm").rglob("*.trace.json.gz"))
