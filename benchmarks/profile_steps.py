"""Where a decode step's device time goes: a JAX profiler trace of steady-state decode steps,
summarized per kernel.

    PYTHONPATH=$PWD python benchmarks/profile_steps.py --config benchmarks/configs/llama-3-8b.json \
        --num-seqs 256 --context 400 --steps 20 --trace-dir /tmp/trace

Prints the kernels that take the most GPU time per step, grouped by name, and the step count.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import pjllm
from pjllm.bench import device_profile


def summarize(trace_dir: str, steps: int, top: int) -> None:
    times = device_profile.kernel_times(trace_dir)
    busy = device_profile.by_kind(times)
    print(f"GPU busy {busy['total'] * 1e3 / steps:.2f} ms per step over {steps} steps: "
          + ", ".join(f"{kind} {busy[kind] * 1e3 / steps:.2f}" for kind in device_profile.KINDS))
    print("\n".join(device_profile.top_kernels(times, top, per=steps)))


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
