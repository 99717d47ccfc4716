"""Command-line options shared by the `pjllm bench` subcommands, and what they build.

Model and engine options mirror `pjllm generate` and `pjllm.EngineConfig`; workload options
select a dataset from `pjllm.bench.datasets`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from pjllm.bench.datasets import DATASETS, Workload, make_workload, special_token_ids
from pjllm.config import (ATTENTION_BACKENDS, DEFAULT_MAX_NUM_BATCHED_TOKENS, DTYPES, LOAD_FORMATS,
                          WARMUP_MODES, EngineConfig)

def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF directory, .gguf file, or a config.json with --load-format dummy "
                             "(default: the default model, SmolLM2-135M-Instruct)")
    parser.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                        help="'dummy': random weights from the config alone")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="'auto': bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload and of sampling")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """pjllm engine options (EngineConfig fields)."""
    parser.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help=f"token budget of one step (engine default {DEFAULT_MAX_NUM_BATCHED_TOKENS})")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: the workload's longest prompt + output, rounded up to a page")
    parser.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="devices one model is split across")
    parser.add_argument("--data-parallel-size", type=int, default=1,
                        help="engine replicas, each on its own tensor-parallel-size devices")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-pages", type=int, default=None)
    parser.add_argument("--compilation-cache-dir", default=None,
                        help="JAX persistent compilation cache and pjllm's compiled step "
                             "programs (default: the engine's, ~/.cache/pjllm/xla; 'none' turns "
                             "both off)")
    parser.add_argument("--warmup", default="blocking",
                        choices=WARMUP_MODES,
                        help="the engine's compile-every-bucket warmup at startup (default "
                             "blocking: construction includes it, so runs time no compiles)")


def add_workload_args(parser: argparse.ArgumentParser, default_dataset: str = "random") -> None:
    parser.add_argument("--dataset", default=default_dataset, choices=DATASETS,
                        help="chat: 1000 x lognormal (median 200 in, 180 out); decode: 256 x (128, 1024); "
                             "prefill: 512 x (1024, 128); random: --input-len/--output-len/--num-prompts")
    parser.add_argument("--num-prompts", type=int, default=None, help="override the dataset's count")
    parser.add_argument("--input-len", type=int, default=None, help="random dataset: prompt tokens")
    parser.add_argument("--output-len", type=int, default=None, help="random dataset: output tokens")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-json", default=None, help="write the results to this JSON file")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine progress")


def resolve_model(args: argparse.Namespace) -> str:
    """The model path, downloading the default model when none is named."""
    if args.model:
        return args.model
    from pjllm.models.default_model import resolve_default_model

    return resolve_default_model()


def load_hf_config(model: str) -> dict[str, Any]:
    """The model's HF config dict (from config.json, an HF directory, or GGUF metadata)."""
    from pjllm.models.weights import load_hf_config as load

    return load(model)


def build_workload(args: argparse.Namespace, hf_config: dict[str, Any], seed: int | None = None) -> Workload:
    """The dataset the options name (with `seed`, default --seed), token ids inside the vocabulary."""
    return make_workload(args.dataset, int(hf_config["vocab_size"]), seed=args.seed if seed is None else seed,
                         num_prompts=args.num_prompts, input_len=args.input_len,
                         output_len=args.output_len, exclude_ids=special_token_ids(hf_config))


def engine_kwargs(args: argparse.Namespace, model: str, max_model_len: int) -> dict[str, Any]:
    """Keyword arguments for `pjllm.LLM` from the engine options."""
    kwargs: dict[str, Any] = dict(
        model=model, load_format=args.load_format, dtype=args.dtype, seed=args.seed,
        max_model_len=args.max_model_len or _round_up(max_model_len, args.page_size),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, attention_backend=args.attention_backend,
        gpu_memory_utilization=args.gpu_memory_utilization, page_size=args.page_size,
        num_pages=args.num_pages, warmup=args.warmup,
        tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=getattr(args, "data_parallel_size", 1))
    if args.compilation_cache_dir is not None:
        cache = args.compilation_cache_dir
        kwargs["compilation_cache_dir"] = None if cache.lower() == "none" else cache
    return kwargs


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def build_llm(args: argparse.Namespace, model: str, max_model_len: int):
    """Creates the pjllm engine; returns (llm, seconds spent: weights + warmup compile)."""
    return construct_llm(engine_kwargs(args, model, max_model_len))


def construct_llm(kwargs: dict[str, Any]):
    """`pjllm.LLM(**kwargs)`, timed: returns (llm, seconds the construction took)."""
    from pjllm.entrypoints.llm import LLM

    kwargs = dict(kwargs)
    start = time.perf_counter()
    llm = LLM(kwargs.pop("model"), **kwargs)
    return llm, time.perf_counter() - start


def engine_settings(llm) -> dict[str, Any]:
    """The resolved engine settings a result should record (of one replica, as they all are)."""
    engine = replicas(llm)[0]
    return {
        "dtype": np.dtype(engine.dtype).name,
        "attention_backend": engine.attention_backend,
        "max_num_seqs": engine.config.max_num_seqs,
        "max_num_batched_tokens": engine.max_num_batched_tokens,
        "max_model_len": engine.max_model_len,
        "page_size": engine.config.page_size,
        "num_pages": engine.kv_cache_manager.num_pages,
        "tensor_parallel_size": engine.config.tensor_parallel_size,
        "data_parallel_size": engine.config.data_parallel_size,
    }


def replicas(llm) -> list:
    """The LLMEngines behind `llm`: its data-parallel replicas, or its one engine."""
    return list(getattr(llm.engine, "replicas", [llm.engine]))
