"""`pjllm bench throughput`: offline throughput on a synthetic workload, like `vllm bench throughput`.

All requests are submitted at once and run to completion; the timed run is warm:

1. the engine compiles every (token, sequence) bucket of the default sampling program at startup
   (`--warmup blocking`), reported as `warmup_s` (weights: `load_s`);
2. an untimed warm-up pass runs --num-warmup-prompts requests of the same dataset drawn with
   seed + 1 (outputs capped at 16 tokens), so first-call costs are paid; --warmup-full runs the
   whole workload itself untimed instead (for --warmup off, where nothing is compiled ahead);
3. the whole workload runs again, timed.

benchmarks/compare_hf.py runs the same measurement on HF transformers (with transformers' own
warmup, CUDA graph capture, in step 1) beside pjllm, and can profile the timed run.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any, Callable, ContextManager, Sequence

from pjllm.bench.backends import Backend, OpenBackend, WorkloadSize
from pjllm.bench.options import (add_engine_args, add_model_args, add_output_args, add_workload_args,
                                 build_workload, load_hf_config, resolve_model)
from pjllm.bench.pjllm_backend import open_pjllm_backend
from pjllm.bench.report import environment, print_table, write_json

WARMUP_OUTPUT_LEN = 16
COLUMNS = [("backend", "backend", ""), ("num_prompts", "requests", ""),
           ("total_prompt_tokens", "prompt tok", ""), ("total_output_tokens", "output tok", ""),
           ("elapsed_s", "time s", ".2f"), ("requests_per_s", "req/s", ".2f"),
           ("total_tokens_per_s", "total tok/s", ".1f"), ("output_tokens_per_s", "output tok/s", ".1f"),
           ("load_s", "load s", ".1f"), ("warmup_s", "warmup s", ".1f")]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "throughput", help="offline throughput: requests/s and tokens/s on a synthetic workload",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_workload_args(parser)
    add_engine_args(parser)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature (1.0, as vllm; 0 is greedy)")
    parser.add_argument("--num-warmup-prompts", type=int, default=16,
                        help="requests of the untimed warm-up pass (0: none)")
    parser.add_argument("--warmup-full", action="store_true",
                        help="run the whole workload once untimed before the timed run")
    add_output_args(parser)
    return parser


def measure(args: argparse.Namespace, open_backend: OpenBackend = open_pjllm_backend,
            timed_run: Callable[[Backend], ContextManager] | None = None) -> dict[str, Any]:
    """One backend's result record for the workload the options describe; `timed_run(backend)`
    wraps the timed run when given (a profiler, say)."""
    model = resolve_model(args)
    hf_config = load_hf_config(model)
    workload = build_workload(args, hf_config)
    requests = workload.requests
    size = WorkloadSize(max(r.prompt_len for r in requests), max(r.output_len for r in requests),
                        workload.max_total_len, len(requests))
    backend = open_backend(args, model, hf_config, size, args.temperature)
    try:
        if args.warmup_full:
            warmup = requests
        else:  # same dataset, other token ids (a prefix cache must not favour the timed run)
            other = build_workload(args, hf_config, seed=args.seed + 1)
            warmup = other.head(max(args.num_warmup_prompts, 0), WARMUP_OUTPUT_LEN)
        start = time.perf_counter()
        if warmup:
            backend.generate(warmup)
        warmup_pass_s = time.perf_counter() - start
        timings_before = backend.step_timings() if hasattr(backend, "step_timings") else {}
        with timed_run(backend) if timed_run else contextlib.nullcontext():
            start = time.perf_counter()
            output_lens = backend.generate(requests)
            elapsed = time.perf_counter() - start
        timings_after = backend.step_timings() if hasattr(backend, "step_timings") else {}
        record: dict[str, Any] = {
            "backend": backend.name, "model": model, "load_format": args.load_format,
            "dataset": workload.name, "num_prompts": len(requests), "seed": args.seed,
            "workload_digest": workload.digest(),
            "total_prompt_tokens": workload.num_prompt_tokens,
            "total_output_tokens": sum(output_lens),
            "expected_output_tokens": workload.num_output_tokens,
            "elapsed_s": elapsed,
            "requests_per_s": len(requests) / elapsed,
            "total_tokens_per_s": (workload.num_prompt_tokens + sum(output_lens)) / elapsed,
            "output_tokens_per_s": sum(output_lens) / elapsed,
            "load_s": backend.load_s,
            "warmup_s": getattr(backend, "warmup_s", None),
            "warmup_pass_s": warmup_pass_s,
            "warmup_pass_prompts": len(warmup),
            "preemptions": backend.preemptions() if hasattr(backend, "preemptions") else None,
            # Engine loop split (pjllm): host work vs waiting on the device, over the timed run.
            "step_timings": ({key: timings_after[key] - timings_before[key] for key in timings_after}
                             if timings_after else None),
            "settings": backend.settings_record(),
            "env": environment(getattr(args, "cli_argv", None), backend.device_info),
        }
    finally:
        backend.close()
    if record["total_output_tokens"] != record["expected_output_tokens"]:
        print(f"warning: {backend.name} generated {record['total_output_tokens']} tokens, the workload "
              f"asks for {record['expected_output_tokens']} (max_model_len too small?)")
    return record


def print_results(results: Sequence[dict[str, Any]]) -> None:
    """The results table, then one summary line per backend."""
    first = results[0]
    title = f"throughput: {first['dataset']} x {first['num_prompts']}, {first['model']}"
    print_table(title, results, COLUMNS)
    for record in results:
        print(f"{record['backend']}: Throughput: {record['requests_per_s']:.2f} requests/s, "
              f"{record['total_tokens_per_s']:.2f} total tokens/s, "
              f"{record['output_tokens_per_s']:.2f} output tokens/s")


def run(args: argparse.Namespace) -> int:
    record = measure(args)
    print_results([record])
    write_json(args.output_json, {"benchmark": "throughput", "results": [record]})
    return 0
