"""Where a decode step's device time goes: a JAX profiler trace of steady-state decode steps,
summarized per kernel.

    PYTHONPATH=$PWD python benchmarks/profile_steps.py --config benchmarks/configs/llama-3-8b.json \
        --num-seqs 256 --context 400 --steps 20 --trace-dir /tmp/trace

Prints the kernels that take the most GPU time per step, grouped by name, and the step count.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import time

import jax
import numpy as np

import pjllm


def summarize(trace_dir: str, steps: int, top: int) -> None:
    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[:1]
    with gzip.open(path) as f:
        trace = json.load(f)
    gpu_pids = {e["pid"] for e in trace["traceEvents"]
                if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    if not gpu_pids:  # a CPU run: summarize every thread's events instead
        gpu_pids = {e.get("pid") for e in trace["traceEvents"]}
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for event in trace["traceEvents"]:
        if event.get("ph") == "X" and event.get("pid") in gpu_pids:
            name = event["name"]
            totals[name] += event.get("dur", 0.0)
            counts[name] += 1
    busy = sum(totals.values())
    print(f"GPU busy {busy / 1e3 / steps:.2f} ms per step over {steps} steps")
    print(f"{'ms/step':>8} {'share':>6} {'calls/step':>10}  kernel")
    for name, micros in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{micros / 1e3 / steps:8.3f} {micros / busy:6.1%} {counts[name] / steps:10.1f}  {name[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--trace-dir", default="/tmp/pjllm-trace")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    llm = pjllm.LLM(args.config, load_format="dummy", max_model_len=args.context + 256,
                    max_num_seqs=args.num_seqs, compilation_cache_dir=None)
    engine = llm.engine
    rng = np.random.default_rng(0)
    params = pjllm.SamplingParams(temperature=args.temperature, max_tokens=args.steps + 64,
                                  ignore_eos=True, seed=0)
    for i in range(args.num_seqs):
        engine.add_request(str(i), {"prompt_token_ids": rng.integers(0, engine.model_config.vocab_size, args.context).tolist()},
                           params)
    while any(not seq.is_prefill_done for r in engine.requests.values() for seq in r.seqs):
        engine.step()
    for _ in range(8):  # settle into steady decode
        engine.step()
    jax.effects_barrier()
    start = time.perf_counter()
    with jax.profiler.trace(args.trace_dir):
        for _ in range(args.steps):
            engine.step()
        jax.effects_barrier()
    print(f"wall {1e3 * (time.perf_counter() - start) / args.steps:.2f} ms per step (traced)")
    summarize(args.trace_dir, args.steps, args.top)
    for request_id in list(engine.requests):
        engine.abort_request(request_id)


if __name__ == "__main__":
    main()
