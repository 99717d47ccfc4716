"""Where a step's device time goes: a JAX profiler trace of steady-state decode steps (default)
or of prefill steps (`--prefill`: num-seqs prompts of --context tokens, chunked into full
max_num_batched_tokens steps), summarized per kernel.

    python -m benchmarks.profile_steps --config benchmarks/configs/llama-3-8b.json \
        --num-seqs 256 --context 400 --steps 20 --trace-dir /tmp/trace
    python -m benchmarks.profile_steps --config benchmarks/configs/llama-3-8b.json \
        --prefill --num-seqs 64 --context 2048 --steps 8

Prints the kernels that take the most GPU time per step, grouped by name, and the step count;
for --prefill also the rate of the decoder layers' matmuls in TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import pjllm
from benchmarks import device_profile
from benchmarks.gemm_rates import projection_shapes


def summarize(trace_dir: str, steps: int, top: int) -> dict[str, float]:
    times = device_profile.kernel_times(trace_dir)
    busy = device_profile.by_kind(times)
    print(f"GPU busy {busy['total'] * 1e3 / steps:.2f} ms per step over {steps} steps: "
          + ", ".join(f"{kind} {busy[kind] * 1e3 / steps:.2f}" for kind in device_profile.KINDS))
    print("\n".join(device_profile.top_kernels(times, top, per=steps)))
    return busy


def trace_steps(engine, args) -> dict[str, float]:
    """Runs --steps engine steps under the JAX profiler; prints and returns GPU time by kind."""
    start = time.perf_counter()
    with device_profile.jax_trace(args.trace_dir):
        for _ in range(args.steps):
            engine.step()
    print(f"wall {1e3 * (time.perf_counter() - start) / args.steps:.2f} ms per step (traced)")
    return summarize(args.trace_dir, args.steps, args.top)


def add_requests(engine, rng, count: int, prompt_len: int, params, prefix: str) -> None:
    for i in range(count):
        prompt = rng.integers(0, engine.model_config.vocab_size, prompt_len).tolist()
        engine.add_request(f"{prefix}{i}", {"prompt_token_ids": prompt}, params)


def abort_all(engine) -> None:
    for request_id in list(engine.requests):
        engine.abort_request(request_id)


def prefill_steps(engine, args, rng, params) -> None:
    """Traces the first --steps steps of fresh prompts, after one untimed round that compiles them."""
    add_requests(engine, rng, args.num_seqs, args.context, params, "warm-")
    for _ in range(args.steps):
        engine.step()
    abort_all(engine)
    jax.effects_barrier()
    add_requests(engine, rng, args.num_seqs, args.context, params, "")
    busy = trace_steps(engine, args)
    # The tokens the traced steps computed (fewer than --steps full steps once the prompts run out).
    tokens = sum(seq.num_computed_tokens for request in engine.requests.values() for seq in request.seqs)
    with open(args.config) as f:
        hf_config = json.load(f)
    layer_flop = 2.0 * tokens * sum(k * n for k, n in projection_shapes(hf_config).values())
    if busy["matmul"] == 0:
        print("no matmul kernels in the trace (no GPU?)")
    else:
        print(f"decoder-layer matmuls over {tokens} tokens in {args.steps} steps: "
              f"{layer_flop * hf_config['num_hidden_layers'] / busy['matmul'] / 1e12:.0f} TFLOP/s "
              f"(all matmul kernel time, lm_head's sampled rows included)")
    abort_all(engine)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--trace-dir", default="/tmp/pjllm-trace")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--prefill", action="store_true", help="trace prefill steps instead of decode")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    args = parser.parse_args()

    llm = pjllm.LLM(args.config, load_format="dummy", max_model_len=args.context + 256,
                    max_num_seqs=args.num_seqs, compilation_cache_dir=None, warmup="blocking",
                    max_num_batched_tokens=args.max_num_batched_tokens)
    engine = llm.engine
    rng = np.random.default_rng(0)
    params = pjllm.SamplingParams(temperature=args.temperature, max_tokens=args.steps + 64,
                                  ignore_eos=True, seed=0)
    if args.prefill:
        prefill_steps(engine, args, rng, params)
        return
    add_requests(engine, rng, args.num_seqs, args.context, params, "")
    while any(not seq.is_prefill_done for r in engine.requests.values() for seq in r.seqs):
        engine.step()
    for _ in range(8):  # settle into steady decode
        engine.step()
    jax.effects_barrier()
    trace_steps(engine, args)
    abort_all(engine)


if __name__ == "__main__":
    main()
