"""pjllm: an LLM inference and serving engine in JAX."""

import os

# JAX's GPU allocator claims 75% of the device when it starts, so a second process (or a second
# engine that wants its own gpu_memory_utilization share) would find nothing left. Allocate on
# demand instead, up to 95% of the device in this process: each engine sizes its KV cache from
# its share of the device's total memory (pjllm/runner/memory.py). This takes effect only if
# jax has not started its GPU backend yet; values the user set win.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
# From a cudaMallocAsync pool rather than the default allocator, which, growing on demand, maps
# every new region as it is asked for: the 8B KV cache (32 layers of 3 GB) took 2.0 s of a warm
# start on the H200 that way, against 0.1 s from the pool (docs/perf.md).
os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "cuda_async")

from pjllm.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from pjllm.config import EngineConfig, ModelConfig
from pjllm.engine.async_engine import AsyncLLM
from pjllm.entrypoints.llm import LLM, generate
from pjllm.outputs import CompletionOutput, Logprob, RequestOutput
from pjllm.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "EngineConfig",
           "ModelConfig", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence", "generate"]
__version__ = "0.1.0"
