"""`pjllm bench parity`: greedy tokens of two attention backends through the whole engine.

The same random prompts run through two engines that differ only in `attention_backend`
(default: `reference`, the pure-jnp oracle, against `pallas`); the greedy token ids are compared
sequence by sequence. On CPU the same check is a test (Pallas in interpret mode).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from pjllm.bench.datasets import make_workload, special_token_ids
from pjllm.bench.options import add_model_args, add_output_args, load_hf_config, resolve_model
from pjllm.bench.report import environment, jax_device_info, print_table, write_json

COLUMNS = [("backends", "backends", ""), ("dtype", "dtype", ""), ("num_prompts", "prompts", ""),
           ("input_len", "in", ""), ("output_len", "out", ""),
           ("identical_sequences", "identical sequences", ""), ("first_divergence_min", "first diff at", "")]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "parity", help="greedy token parity between two attention backends",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--backends", default="reference,pallas",
                        help="the two attention backends to compare, comma-separated")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: the longest prompt plus output")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    add_output_args(parser)
    return parser


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def run(args: argparse.Namespace) -> int:
    import pjllm

    backends = [name.strip() for name in args.backends.split(",")]
    if len(backends) != 2:
        raise ValueError(f"--backends must name two attention backends; got {args.backends!r}")
    model = resolve_model(args)
    hf_config = load_hf_config(model)
    workload = make_workload("random", int(hf_config["vocab_size"]), args.seed, args.num_prompts,
                             args.input_len, args.output_len, special_token_ids(hf_config))
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload.requests]
    params = pjllm.SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    tokens: dict[str, list[list[int]]] = {}
    max_model_len = args.max_model_len or args.input_len + args.output_len
    for backend in backends:
        with pjllm.LLM(model, load_format=args.load_format, dtype=args.dtype,
                       max_model_len=max_model_len, max_num_seqs=args.num_prompts,
                       max_num_batched_tokens=args.max_num_batched_tokens, attention_backend=backend,
                       warmup="off", compilation_cache_dir=None,
                       gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed) as llm:
            dtype = np.dtype(llm.engine.dtype).name
            tokens[backend] = [o.outputs[0].token_ids
                               for o in llm.generate(prompts, params, use_tqdm=False)]
    a, b = (tokens[name] for name in backends)
    divergence = [_first_divergence(x, y) for x, y in zip(a, b)]
    diverged = [d for d in divergence if d is not None]
    record: dict[str, Any] = {
        "backend": "pjllm", "model": model, "load_format": args.load_format, "backends": ",".join(backends),
        "dtype": dtype, "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "identical_sequences": sum(d is None for d in divergence),
        "first_divergence": divergence, "first_divergence_min": min(diverged) if diverged else None,
        "env": environment(getattr(args, "cli_argv", None), jax_device_info)}
    print_table(f"greedy parity: {model}", [record], COLUMNS)
    write_json(args.output_json, {"benchmark": "parity", "results": [record]})
    return 0
