"""`pjllm bench` subcommands end to end on a tiny random-weight model (CPU). No speeds asserted."""

import json

from pjllm.entrypoints.cli import main

MODEL = ["--model", "tests/golden/llama3/config.json", "--load-format", "dummy"]
SMALL_ENGINE = ["--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--compilation-cache-dir", "none"]
RECORD_KEYS = {"backend", "model", "settings", "env", "load_s", "warmup_s"}
ENV_KEYS = {"date", "command", "pjllm_commit", "device", "platform", "jax"}


def _run(argv, path):
    assert main([*argv, "--output-json", str(path)]) == 0
    return json.loads(path.read_text())


def test_throughput_end_to_end(tmp_path, capsys):
    payload = _run(["bench", "throughput", *MODEL, *SMALL_ENGINE, "--dataset", "random", "--num-prompts", "6",
                    "--input-len", "12", "--output-len", "5", "--num-warmup-prompts", "2"],
                   tmp_path / "t.json")
    assert payload["benchmark"] == "throughput" and "ratios" not in payload
    (record,) = payload["results"]
    assert RECORD_KEYS | {"dataset", "num_prompts", "total_prompt_tokens", "total_output_tokens", "elapsed_s",
                          "requests_per_s", "total_tokens_per_s", "output_tokens_per_s", "workload_digest",
                          "warmup_pass_s", "preemptions"} <= set(record)
    assert ENV_KEYS <= set(record["env"])
    assert record["total_prompt_tokens"] == 6 * 12 and record["total_output_tokens"] == 6 * 5
    assert record["settings"]["max_num_seqs"] == 4
    assert "requests/s" in capsys.readouterr().out


def test_throughput_over_data_parallel_replicas(tmp_path):
    payload = _run(["bench", "throughput", *MODEL, *SMALL_ENGINE, "--data-parallel-size", "2",
                    "--dataset", "random", "--num-prompts", "6", "--input-len", "12",
                    "--output-len", "5", "--num-warmup-prompts", "0", "--warmup", "off"],
                   tmp_path / "t.json")
    (record,) = payload["results"]
    assert record["total_output_tokens"] == 6 * 5
    assert record["settings"]["data_parallel_size"] == 2
    assert record["step_timings"]["steps"] >= 5  # summed over the replicas
    assert record["preemptions"] == 0


def test_latency_end_to_end(tmp_path):
    payload = _run(["bench", "latency", *MODEL, *SMALL_ENGINE, "--batch-sizes", "1,2", "--input-len", "8",
                    "--output-len", "4", "--num-iters", "2", "--num-iters-warmup", "1"], tmp_path / "l.json")
    (record,) = payload["results"]
    assert RECORD_KEYS <= set(record)
    assert [row["batch_size"] for row in record["rows"]] == [1, 2]
    for row in record["rows"]:
        assert {"ttft_ms", "tpot_ms", "e2e_ms", "decode_tokens_per_s"} <= set(row)
        assert len(row["ttft_ms_all"]) == 2 and row["ttft_ms"] > 0


def test_parity_end_to_end(tmp_path):
    # reference against itself: exercises the command without Pallas interpret-mode cost.
    payload = _run(["bench", "parity", *MODEL, "--backends", "reference,reference", "--num-prompts", "2",
                    "--input-len", "8", "--output-len", "3"], tmp_path / "p.json")
    (record,) = payload["results"]
    assert record["identical_sequences"] == 2 and record["first_divergence"] == [None, None]


def test_startup_end_to_end(tmp_path):
    payload = _run(["bench", "startup", *MODEL, "--max-num-seqs", "1", "--max-num-batched-tokens", "16",
                    "--input-len", "8", "--warmup", "background"], tmp_path / "s.json")
    (record,) = payload["results"]
    assert [run["cache"] for run in record["runs"]] == ["cold", "warm"]
    for run in record["runs"]:
        assert {"interpreter_s", "import_s", "weights_s", "compile_s", "rest_s", "first_token_s",
                "total_s"} <= set(run)
        assert run["weights_s"] is not None and run["compile_s"] is not None  # log records were found
        assert run["total_s"] >= run["first_token_s"]
        # CPU token buckets for a 16-token budget: 1, 2, 4, 8, 16.
        assert run["all_programs_s"] >= run["compile_s"] > 0 and run["num_buckets"] == 5
    # The warm start loads every program the cold one built from the compiled program store.
    cold, warm = record["runs"]
    assert cold["programs_loaded"] == 0 and warm["programs_loaded"] == warm["num_programs"] > 5
    assert warm["lower_s"] == 0.0
    assert ENV_KEYS <= set(record["env"])
