"""pjllm: an LLM inference and serving engine in JAX."""

from pjllm.config import EngineConfig, ModelConfig
from pjllm.entrypoints.llm import LLM, generate
from pjllm.outputs import CompletionOutput, Logprob, RequestOutput
from pjllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "EngineConfig",
           "ModelConfig", "generate"]
__version__ = "0.1.0"
