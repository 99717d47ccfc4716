"""Engine checks on the GPU machine: Pallas-vs-reference greedy parity and offline throughput.

Models have random weights (`load_format="dummy"`) from real configs under benchmarks/configs/,
and EOS is ignored so lengths are fixed. Prints one JSON line per measurement.

    python benchmarks/gpu_engine.py parity --config benchmarks/configs/llama-3.2-1b.json
    python benchmarks/gpu_engine.py throughput --config benchmarks/configs/llama-3-8b.json \
        --num-prompts 256 --input-len 128 --output-len 256
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time

import jax
import numpy as np

import pjllm


def _random_prompts(count: int, length: int, vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(0, vocab, length).tolist()} for _ in range(count)]


def parity(args: argparse.Namespace) -> None:
    params = pjllm.SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    tokens = {}
    for backend in ("reference", "pallas"):
        llm = pjllm.LLM(args.config, load_format="dummy", dtype=args.dtype, max_model_len=2048,
                        max_num_seqs=args.num_prompts, max_num_batched_tokens=1024,
                        attention_backend=backend, warmup=False, compilation_cache_dir=None,
                        gpu_memory_utilization=0.4)
        vocab = llm.engine.model_config.vocab_size
        prompts = _random_prompts(args.num_prompts, args.input_len, vocab, args.seed)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        tokens[backend] = [o.outputs[0].token_ids for o in outputs]
        del llm
        gc.collect()
    ref, pal = tokens["reference"], tokens["pallas"]
    exact = sum(a == b for a, b in zip(ref, pal))
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ref, pal)]
    print(json.dumps({"check": "greedy_parity", "config": args.config, "dtype": args.dtype,
                      "num_prompts": args.num_prompts, "input_len": args.input_len,
                      "output_len": args.output_len, "identical_sequences": exact,
                      "first_divergence": first_diff, "device": jax.devices()[0].device_kind}))


def throughput(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    llm = pjllm.LLM(args.config, load_format="dummy", dtype=args.dtype, max_model_len=args.max_model_len,
                    max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    attention_backend=args.attention_backend, warmup=False, compilation_cache_dir=None)
    load_s = time.perf_counter() - start
    vocab = llm.engine.model_config.vocab_size
    prompts = _random_prompts(args.num_prompts, args.input_len, vocab, args.seed)
    params = pjllm.SamplingParams(temperature=args.temperature, max_tokens=args.output_len,
                                  ignore_eos=True, seed=0)
    runs = []
    for _ in range(2):  # the first run compiles the buckets it meets; the second is timed
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        runs.append(time.perf_counter() - start)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    elapsed = runs[1]
    print(json.dumps({
        "check": "throughput", "config": args.config, "dtype": args.dtype,
        "attention_backend": llm.engine.attention_backend, "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "num_pages": llm.engine.kv_cache_manager.num_pages, "load_s": round(load_s, 2),
        "first_run_s": round(runs[0], 2), "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(args.num_prompts / elapsed, 2),
        "output_tokens_per_s": round(output_tokens / elapsed, 1),
        "total_tokens_per_s": round((output_tokens + args.num_prompts * args.input_len) / elapsed, 1),
        "preemptions": llm.engine.scheduler.num_preemptions,
        "device": jax.devices()[0].device_kind}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["parity", "throughput"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--attention-backend", default="pallas")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    {"parity": parity, "throughput": throughput}[args.mode](args)


if __name__ == "__main__":
    main()
