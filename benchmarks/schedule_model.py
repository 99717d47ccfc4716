"""How fast a workload could run: replays pjllm's schedule (FCFS, one token budget per step,
chunked prefill, max_num_seqs) on a cost model of one step, without a GPU.

    python benchmarks/schedule_model.py --dataset chat --max-num-seqs 1024 --max-num-batched-tokens 8192

A step costs max(weights / bandwidth, padded tokens x FLOP per token / matmul rate) for the
matmuls, plus KV bytes read / attention bandwidth, plus a fixed per-step overhead. The defaults
are Llama-3-8B on an H100 as measured (docs/perf.md); `--ideal` uses peak rates and no overhead.
Admission stops when the KV cache is full (the engine preempts instead; chat never needs to).
"""

from __future__ import annotations

import argparse

import numpy as np

from pjllm.bench.datasets import make_workload
from pjllm.runner.model_runner import token_bucket_sizes

WEIGHT_BYTES = 16.06e9         # Llama-3-8B in bf16
FLOP_PER_TOKEN = 2 * 7.5e9     # matmul parameters, lm_head included
KV_BYTES_PER_TOKEN = 131072    # 32 layers x K,V x 8 heads x 128 x 2 bytes


def replay(prompt_lens, output_lens, max_num_seqs: int, budget: int, kv_tokens: int) -> np.ndarray:
    """Per step: (scheduled tokens, running sequences, KV tokens read by decodes)."""
    waiting = [[p, o, 0, 0] for p, o in zip(prompt_lens, output_lens)][::-1]  # prompt, out, computed, made
    running, steps = [], []
    while waiting or running:
        left, tokens, decode_context = budget, 0, 0
        for seq in running:
            count = min(seq[0] + seq[3] - seq[2], left)
            seq[2] += count
            left -= count
            tokens += count
            decode_context += seq[2] if count == 1 else 0
        in_cache = sum(seq[0] + seq[3] for seq in running)
        while waiting and left > 0 and len(running) < max_num_seqs and in_cache + waiting[-1][0] <= kv_tokens:
            seq = waiting.pop()
            running.append(seq)
            count = min(seq[0], left)
            seq[2] += count
            left -= count
            tokens += count
            in_cache += seq[0]
        steps.append((tokens, len(running), decode_context))
        for seq in running:
            if seq[2] == seq[0] + seq[3]:
                seq[3] += 1
        running = [seq for seq in running if seq[3] < seq[1]]
    return np.array(steps, np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="chat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--kv-tokens", type=int, default=404752, help="KV cache size in tokens")
    parser.add_argument("--matmul-tflops", type=float, default=650.0)
    parser.add_argument("--weight-tbps", type=float, default=3.0)
    parser.add_argument("--attention-tbps", type=float, default=2.7)
    parser.add_argument("--step-overhead-ms", type=float, default=1.1)
    parser.add_argument("--ideal", action="store_true",
                        help="800 TFLOP/s, 3.0 TB/s for weights and KV alike, no step overhead")
    args = parser.parse_args()
    if args.ideal:
        args.matmul_tflops, args.attention_tbps, args.step_overhead_ms = 800.0, 3.0, 0.0

    workload = make_workload(args.dataset, 128256, seed=args.seed)
    prompts = [r.prompt_len for r in workload.requests]
    outputs = [r.output_len for r in workload.requests]
    steps = replay(prompts, outputs, args.max_num_seqs, args.max_num_batched_tokens, args.kv_tokens)
    buckets = np.array(token_bucket_sizes(args.max_num_batched_tokens))
    padded = buckets[np.searchsorted(buckets, steps[:, 0])]
    weight_bound = WEIGHT_BYTES / (args.weight_tbps * 1e12)
    compute = padded * FLOP_PER_TOKEN / (args.matmul_tflops * 1e12)
    matmul = np.maximum(weight_bound, compute)
    attention = steps[:, 2] * KV_BYTES_PER_TOKEN / (args.attention_tbps * 1e12)
    overhead = np.full(len(steps), args.step_overhead_ms / 1e3)
    total = matmul + attention + overhead
    tail = steps[:, 1] < args.max_num_seqs / 2
    print(f"{args.dataset}: {sum(prompts)} prompt + {sum(outputs)} output tokens, {len(steps)} steps")
    print(f"  matmuls   {matmul.sum():6.1f} s  ({(compute > weight_bound).sum()} compute-bound steps "
          f"{matmul[compute > weight_bound].sum():.1f} s, the rest bound by reading the weights)")
    print(f"  attention {attention.sum():6.1f} s  ({steps[:, 2].sum() * KV_BYTES_PER_TOKEN / 1e12:.1f} TB of KV)")
    print(f"  overhead  {overhead.sum():6.1f} s")
    print(f"  total     {total.sum():6.1f} s = {sum(outputs) / total.sum():,.0f} output tok/s; "
          f"{tail.sum()} steps run under half of max_num_seqs and take {total[tail].sum():.1f} s")


if __name__ == "__main__":
    main()
