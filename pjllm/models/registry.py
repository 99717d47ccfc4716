"""The model families pjllm runs: HF `architectures` names -> the class implementing each.

Adding a family: a new file under pjllm/models/ whose class declares `architectures` (and the
rest of the interface in docs/architecture.md), listed in MODEL_CLASSES."""

from __future__ import annotations

from collections.abc import Sequence

from pjllm.models.bloom import BloomForCausalLM
from pjllm.models.falcon import FalconForCausalLM
from pjllm.models.gemma3 import Gemma3ForCausalLM
from pjllm.models.gpt2 import GPT2LMHeadModel
from pjllm.models.gpt_neox import GPTNeoXForCausalLM
from pjllm.models.interface import CausalLM
from pjllm.models.llama import LlamaForCausalLM
from pjllm.models.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES: tuple[type[CausalLM], ...] = (LlamaForCausalLM, Qwen3ForCausalLM, GPT2LMHeadModel,
                                              GPTNeoXForCausalLM, Gemma3ForCausalLM,
                                              BloomForCausalLM, FalconForCausalLM)
MODELS: dict[str, type[CausalLM]] = {
    architecture: cls for cls in MODEL_CLASSES for architecture in cls.architectures}
_BY_MODEL_TYPE = {model_type: architecture for cls in MODEL_CLASSES
                  for architecture, model_type in cls.architectures.items()}


def resolve_architecture(names: Sequence[str]) -> str:
    """The first supported architecture among `names` (HF `architectures` entries, or a
    `model_type` such as "llama").

    Raises ValueError naming the supported architectures when none of `names` is supported.
    """
    for name in names:
        if name in MODELS:
            return name
        if name in _BY_MODEL_TYPE:
            return _BY_MODEL_TYPE[name]
    raise ValueError(f"architectures {list(names)} not supported; supported: {', '.join(MODELS)}")


def model_class(architecture: str) -> type[CausalLM]:
    """The class implementing a resolved architecture (see `resolve_architecture`)."""
    return MODELS[resolve_architecture([architecture])]
