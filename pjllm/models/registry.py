"""Which HF architectures pjllm runs: one Llama-family implementation serves all of them."""

from __future__ import annotations

from collections.abc import Sequence

# HF `architectures` names -> the `model_type` that also identifies them in a config.json.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_BY_MODEL_TYPE = {model_type: arch for arch, model_type in SUPPORTED_ARCHITECTURES.items()}


def resolve_architecture(names: Sequence[str]) -> str:
    """The first supported architecture among `names` (HF `architectures` entries, or a
    `model_type` such as "llama").

    Raises ValueError naming the supported architectures when none of `names` is supported.
    """
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
        if name in _BY_MODEL_TYPE:
            return _BY_MODEL_TYPE[name]
    raise ValueError(f"architectures {list(names)} not supported; "
                     f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
