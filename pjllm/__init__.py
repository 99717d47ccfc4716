"""pjllm: an LLM inference and serving engine in JAX."""

import os

# JAX's GPU allocator claims 75% of device memory unless told otherwise; an inference engine
# wants nearly all of it for the KV cache (gpu_memory_utilization is a fraction of this pool).
# It takes effect only if jax has not started its GPU backend yet; a value the user set wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

from pjllm.config import EngineConfig, ModelConfig
from pjllm.entrypoints.llm import LLM, generate
from pjllm.outputs import CompletionOutput, Logprob, RequestOutput
from pjllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "EngineConfig",
           "ModelConfig", "generate"]
__version__ = "0.1.0"
