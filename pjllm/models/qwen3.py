"""Qwen3 (dense): the Llama decoder with each query and key head RMS-normalised before rotary,
no q/k/v bias, and head_dim set apart from hidden_size / heads."""

from __future__ import annotations

from pjllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    architectures = {"Qwen3ForCausalLM": "qwen3"}
    qk_norm = True
