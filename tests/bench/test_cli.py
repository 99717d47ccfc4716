"""`pjllm bench` argument parsing and the `--backend both` plumbing (no engine runs here)."""

import json

import pytest

from pjllm.bench import available_subcommands, backends, throughput
from pjllm.entrypoints.cli import build_parser

MODEL = ["--model", "tests/golden/llama3/config.json", "--load-format", "dummy"]


def test_subcommands_are_registered():
    names = available_subcommands()
    assert {"throughput", "latency", "startup", "parity"} <= set(names)


def test_throughput_parses():
    args = build_parser().parse_args([
        "bench", "throughput", *MODEL, "--dataset", "chat", "--num-prompts", "5", "--backend", "both",
        "--max-num-seqs", "8", "--dtype", "bfloat16", "--attention-backend", "pallas",
        "--gpu-memory-utilization", "0.5", "--hf-cb-config", '{"max_batch_tokens": 4096}',
        "--output-json", "x.json"])
    assert (args.command, args.bench_command) == ("bench", "throughput")
    assert (args.dataset, args.num_prompts) == ("chat", 5)
    assert args.backend == "both" and args.hf_cb_config == {"max_batch_tokens": 4096}
    assert args.warmup == "blocking" and args.temperature == 1.0


def test_latency_parses_batch_sizes():
    args = build_parser().parse_args(["bench", "latency", *MODEL, "--batch-sizes", "1,2,8",
                                      "--input-len", "32"])
    assert args.batch_sizes == [1, 2, 8] and args.input_len == 32 and args.max_num_seqs is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "latency", "--batch-sizes", "0,2"])


def test_startup_and_parity_parse():
    args = build_parser().parse_args(["bench", "startup", *MODEL, "--warmup", "off"])
    assert args.bench_command == "startup" and args.warmup == "off"
    args = build_parser().parse_args(["bench", "parity", *MODEL, "--backends", "reference,pallas"])
    assert args.bench_command == "parity" and args.backends == "reference,pallas"


def test_unknown_dataset_is_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "throughput", "--dataset", "sharegpt"])


def test_child_argv_replaces_backend_and_output():
    argv = ["bench", "throughput", "--backend", "both", "--num-prompts", "3", "--output-json=out.json"]
    assert backends.child_argv(argv, "hf", "/tmp/hf.json") == [
        "bench", "throughput", "--num-prompts", "3", "--backend", "hf", "--output-json", "/tmp/hf.json"]


def test_both_merges_results_and_prints_ratio(monkeypatch, tmp_path, capsys):
    def fake_children(args):
        record = {"dataset": "chat", "num_prompts": 4, "model": "m", "workload_digest": "abc",
                  "elapsed_s": 1.0, "requests_per_s": 4.0, "total_tokens_per_s": 100.0,
                  "output_tokens_per_s": 50.0}
        hf = {**record, "backend": "hf", "output_tokens_per_s": 10.0}
        return [{"benchmark": "throughput", "results": [{**record, "backend": "pjllm"}]},
                {"benchmark": "throughput", "results": [hf]}]

    from pjllm.bench import backends

    monkeypatch.setattr(backends, "run_backends_in_children", fake_children)
    out = tmp_path / "both.json"
    args = build_parser().parse_args(["bench", "throughput", "--backend", "both",
                                      "--output-json", str(out)])
    assert throughput.run(args) == 0
    payload = json.loads(out.read_text())
    assert [r["backend"] for r in payload["results"]] == ["pjllm", "hf"]
    assert payload["ratios"]["pjllm_over_hf"]["output_tokens_per_s"] == pytest.approx(5.0)
    assert "pjllm / hf" in capsys.readouterr().out
