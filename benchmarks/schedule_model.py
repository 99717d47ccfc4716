"""How fast a workload could run: replays pjllm's schedule (FCFS, one token budget per step,
chunked prefill, max_num_seqs) on a cost model of one step, without a GPU.

    python benchmarks/schedule_model.py --dataset chat --max-num-seqs 1024 --max-num-batched-tokens 8192

A step costs max(weights / bandwidth, padded tokens x FLOP per token / matmul rate) for the
matmuls, plus KV bytes read / attention bandwidth, plus a fixed per-step overhead. The defaults
are Llama-3-8B on an H100 as measured (docs/perf.md); `--ideal` uses peak rates and no overhead.
The schedule is pjllm's own `Scheduler` and page allocator, so preemption works as in the engine.
"""

from __future__ import annotations

import argparse

import numpy as np

from pjllm.bench.datasets import BenchRequest, make_workload
from pjllm.engine.kv_cache_manager import KVCacheManager
from pjllm.engine.scheduler import Scheduler
from pjllm.engine.sequence import Request, Sequence
from pjllm.runner.model_runner import token_bucket_sizes
from pjllm.sampling_params import SamplingParams

WEIGHT_BYTES = 16.06e9         # Llama-3-8B in bf16
FLOP_PER_TOKEN = 2 * 7.5e9     # matmul parameters, lm_head included
KV_BYTES_PER_TOKEN = 131072    # 32 layers x K,V x 8 heads x 128 x 2 bytes


def step_shape(step) -> tuple[int, int, int]:
    """(scheduled tokens, sequences, KV tokens read by decodes) of one `Scheduler.schedule()`
    result, before the step runs."""
    decode_context = sum(item.seq.num_computed_tokens + 1 for item in step.scheduled
                         if item.num_new_tokens == 1)
    return step.num_tokens, len(step.scheduled), decode_context


def padded_tokens(steps: np.ndarray, max_num_batched_tokens: int) -> np.ndarray:
    """The token bucket each of `steps` [S, 3] (`step_shape`s) is padded to."""
    buckets = np.array(token_bucket_sizes(max_num_batched_tokens))
    return buckets[np.searchsorted(buckets, steps[:, 0])]


def step_costs(steps: np.ndarray, max_num_batched_tokens: int, matmul_tflops: float,
               weight_tbps: float, attention_tbps: float, step_overhead_ms: float) -> dict[str, np.ndarray]:
    """The cost model's seconds per step, by part, for `steps` [S, 3] of `step_shape`s:
    matmul, attention, overhead, total; and compute_bound (whether FLOPs, not the weights'
    bytes, bound the matmuls)."""
    padded = padded_tokens(steps, max_num_batched_tokens)
    weight_bound = WEIGHT_BYTES / (weight_tbps * 1e12)
    compute = padded * FLOP_PER_TOKEN / (matmul_tflops * 1e12)
    matmul = np.maximum(weight_bound, compute)
    attention = steps[:, 2] * KV_BYTES_PER_TOKEN / (attention_tbps * 1e12)
    overhead = np.full(len(steps), step_overhead_ms / 1e3)
    return {"matmul": matmul, "attention": attention, "overhead": overhead,
            "total": matmul + attention + overhead, "compute_bound": compute > weight_bound}


def add_cost_args(parser: argparse.ArgumentParser) -> None:
    """The cost model's rates (defaults: Llama-3-8B on an H100, as measured)."""
    parser.add_argument("--matmul-tflops", type=float, default=650.0)
    parser.add_argument("--weight-tbps", type=float, default=3.0)
    parser.add_argument("--attention-tbps", type=float, default=2.7)
    parser.add_argument("--step-overhead-ms", type=float, default=1.1)


def replay(requests: list[BenchRequest], max_num_seqs: int, budget: int, num_pages: int,
           page_size: int) -> np.ndarray:
    """Runs pjllm's own Scheduler (and page allocator, prefix cache included) over the workload
    as the engine loop would, without a model. The prompts are the workload's own token ids, so
    the prefix cache hits only where the engine's would. Per step: (scheduled tokens, running
    sequences, KV tokens read by decodes)."""
    scheduler = Scheduler(KVCacheManager(num_pages, page_size), max_num_seqs, budget)
    for seq_id, bench in enumerate(requests):
        prompt = list(bench.prompt_token_ids)
        request = Request(str(seq_id), None, prompt, SamplingParams(max_tokens=bench.output_len), ())
        request.seqs.append(Sequence(seq_id, request, 0, 0, list(prompt), bench.prompt_len,
                                     bench.prompt_len + bench.output_len))
        scheduler.add(request.seqs[0])
    steps = []
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        steps.append(step_shape(out))
        for item in out.scheduled:
            samples = item.samples
            item.seq.num_computed_tokens += item.num_new_tokens
            if samples:
                item.seq.token_ids.append(0)
                if item.seq.is_complete:
                    scheduler.finish(item.seq, "length")
    if scheduler.num_preemptions:
        print(f"  ({scheduler.num_preemptions} preemptions: the KV cache filled)")
    return np.array(steps, np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="chat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--num-pages", type=int, default=25297, help="KV cache pages (H100 default)")
    parser.add_argument("--page-size", type=int, default=16)
    add_cost_args(parser)
    parser.add_argument("--ideal", action="store_true",
                        help="800 TFLOP/s, 3.0 TB/s for weights and KV alike, no step overhead")
    args = parser.parse_args()
    if args.ideal:
        args.matmul_tflops, args.attention_tbps, args.step_overhead_ms = 800.0, 3.0, 0.0

    workload = make_workload(args.dataset, 128256, seed=args.seed)
    prompts = [r.prompt_len for r in workload.requests]
    outputs = [r.output_len for r in workload.requests]
    steps = replay(workload.requests, args.max_num_seqs, args.max_num_batched_tokens, args.num_pages,
                   args.page_size)
    costs = step_costs(steps, args.max_num_batched_tokens, args.matmul_tflops, args.weight_tbps,
                       args.attention_tbps, args.step_overhead_ms)
    matmul, attention, overhead, total = (costs[k] for k in ("matmul", "attention", "overhead", "total"))
    compute_bound = costs["compute_bound"]
    tail = steps[:, 1] < args.max_num_seqs / 2
    print(f"{args.dataset}: {sum(prompts)} prompt + {sum(outputs)} output tokens, {len(steps)} steps")
    print(f"  matmuls   {matmul.sum():6.1f} s  ({compute_bound.sum()} compute-bound steps "
          f"{matmul[compute_bound].sum():.1f} s, the rest bound by reading the weights)")
    print(f"  attention {attention.sum():6.1f} s  ({steps[:, 2].sum() * KV_BYTES_PER_TOKEN / 1e12:.1f} TB of KV)")
    print(f"  overhead  {overhead.sum():6.1f} s")
    print(f"  total     {total.sum():6.1f} s = {sum(outputs) / total.sum():,.0f} output tok/s; "
          f"{tail.sum()} steps run under half of max_num_seqs and take {total[tail].sum():.1f} s")


if __name__ == "__main__":
    main()
