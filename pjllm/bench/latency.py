"""`pjllm bench latency`: time to first token and time per output token at small batch sizes.

For each batch size B, each iteration submits B fresh random prompts of --input-len tokens twice:
once with max_tokens=1 (its wall time is the time to first token, TTFT: prefill and one sample)
and once with max_tokens=--output-len L (end-to-end time E). Time per output token is
TPOT = (E - TTFT) / (L - 1), the decode step time at batch B. Medians over --num-iters
iterations, after --num-iters-warmup untimed ones. Prompts differ between every submission, so a
prefix cache could not shorten a prefill. benchmarks/compare_hf.py runs the same measurement on HF
transformers beside pjllm.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Sequence

import numpy as np

from pjllm.bench.backends import Backend, OpenBackend, WorkloadSize
from pjllm.bench.datasets import BenchRequest, allowed_token_ids, random_requests, special_token_ids
from pjllm.bench.options import (add_engine_args, add_model_args, add_output_args, load_hf_config,
                                 resolve_model)
from pjllm.bench.pjllm_backend import open_pjllm_backend
from pjllm.bench.report import environment, print_table, write_json

COLUMNS = [("backend", "backend", ""), ("batch_size", "batch", ""), ("ttft_ms", "TTFT ms", ".2f"),
           ("tpot_ms", "TPOT ms", ".3f"), ("e2e_ms", "end-to-end ms", ".1f"),
           ("decode_tokens_per_s", "decode tok/s", ".1f")]


def _batch_sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"--batch-sizes must be positive integers, e.g. 1,4,16; got {text!r}")
    return sizes


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "latency", help="time to first token and time per output token per batch size",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_engine_args(parser)
    parser.set_defaults(max_num_seqs=None)  # default: the largest batch size
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 4, 16])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--num-iters-warmup", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    add_output_args(parser)
    return parser


def _timed(backend: Backend, requests: list[BenchRequest]) -> float:
    start = time.perf_counter()
    backend.generate(requests)
    return time.perf_counter() - start


def measure(args: argparse.Namespace, open_backend: OpenBackend = open_pjllm_backend) -> dict[str, Any]:
    """One backend's record: a row of medians per batch size."""
    if args.output_len < 2:
        raise ValueError(f"--output-len must be >= 2 to time decode steps; got {args.output_len}")
    model = resolve_model(args)
    hf_config = load_hf_config(model)
    pool = allowed_token_ids(int(hf_config["vocab_size"]), special_token_ids(hf_config))
    rng = np.random.default_rng(args.seed)
    largest = max(args.batch_sizes)
    if args.max_num_seqs is None:
        args.max_num_seqs = largest
    size = WorkloadSize(args.input_len, args.output_len, args.input_len + args.output_len, largest)
    backend = open_backend(args, model, hf_config, size, args.temperature)
    rows = []
    try:
        for batch_size in args.batch_sizes:
            ttfts, e2es = [], []
            for iteration in range(args.num_iters_warmup + args.num_iters):
                first = random_requests(rng, [args.input_len] * batch_size, [1] * batch_size, pool)
                full = random_requests(rng, [args.input_len] * batch_size, [args.output_len] * batch_size,
                                       pool)
                ttft, e2e = _timed(backend, first), _timed(backend, full)
                if iteration >= args.num_iters_warmup:
                    ttfts.append(ttft)
                    e2es.append(e2e)
            ttft, e2e = statistics.median(ttfts), statistics.median(e2es)
            tpot = max(e2e - ttft, 0.0) / (args.output_len - 1)
            rows.append({"batch_size": batch_size, "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3,
                         "e2e_ms": e2e * 1e3,
                         "decode_tokens_per_s": batch_size / tpot if tpot > 0 else None,
                         "ttft_ms_all": [t * 1e3 for t in ttfts], "e2e_ms_all": [t * 1e3 for t in e2es]})
        record = {"backend": backend.name, "model": model, "load_format": args.load_format,
                  "input_len": args.input_len, "output_len": args.output_len,
                  "num_iters": args.num_iters, "num_iters_warmup": args.num_iters_warmup,
                  "seed": args.seed, "load_s": backend.load_s, "warmup_s": getattr(backend, "warmup_s", None),
                  "rows": rows, "settings": backend.settings_record(),
                  "env": environment(getattr(args, "cli_argv", None), backend.device_info)}
    finally:
        backend.close()
    return record


def print_results(results: Sequence[dict[str, Any]]) -> None:
    """One table row per backend and batch size."""
    table = [{"backend": r["backend"], **row} for r in results for row in r["rows"]]
    first = results[0]
    title = f"latency: {first['input_len']} in, {first['output_len']} out, {first['model']}"
    print_table(title, table, COLUMNS)


def run(args: argparse.Namespace) -> int:
    record = measure(args)
    print_results([record])
    write_json(args.output_json, {"benchmark": "latency", "results": [record]})
    return 0
