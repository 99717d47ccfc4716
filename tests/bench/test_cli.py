"""`pjllm bench` argument parsing (no engine runs here)."""

import pytest

from pjllm.bench import available_subcommands
from pjllm.entrypoints.cli import build_parser

MODEL = ["--model", "tests/golden/llama3/config.json", "--load-format", "dummy"]


def test_subcommands_are_registered():
    names = available_subcommands()
    assert {"throughput", "latency", "serve", "startup", "parity"} <= set(names)


def test_throughput_parses():
    args = build_parser().parse_args([
        "bench", "throughput", *MODEL, "--dataset", "chat", "--num-prompts", "5",
        "--max-num-seqs", "8", "--dtype", "bfloat16", "--attention-backend", "pallas",
        "--gpu-memory-utilization", "0.5", "--output-json", "x.json"])
    assert (args.command, args.bench_command) == ("bench", "throughput")
    assert (args.dataset, args.num_prompts) == ("chat", 5)
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
