"""Gemma 3 (text): local sliding-window layers interleaved with global ones (each kind with its
own rotary base), per-head q/k RMSNorm, RMSNorms with a unit offset before and after both
attention and MLP, embeddings scaled by sqrt(hidden), a GeGLU MLP and tied output embeddings."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pjllm.config import ModelConfig
from pjllm.kernels.attention_metadata import AttentionMetadata
from pjllm.models.layers import (AttentionBackend, GatedMLP, RMSNorm, activation, call_layer,
                                 init_param, rope_inv_freq)
from pjllm.models.llama import Attention, LlamaForCausalLM

_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
          "post_feedforward_layernorm")


class Gemma3DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: Any, rngs: nnx.Rngs):
        embed, eps = config.hidden_size, config.rms_norm_eps
        for name in _NORMS:
            setattr(self, name, RMSNorm(embed, eps, dtype, unit_offset=True))
        self.self_attn = Attention(config, dtype, rngs, qk_norm=True,
                                   sliding_window=config.layer_window(layer),
                                   sm_scale=config.query_pre_attn_scalar ** -0.5,
                                   norm_unit_offset=True)
        self.mlp = GatedMLP(embed, config.intermediate_size, dtype, rngs,
                            activation=activation(config.hidden_act))

    def __call__(self, x, kv_pages, metadata, positions, inv_freq, *, backend):
        attn_out, kv_pages = self.self_attn(self.input_layernorm(x), positions, inv_freq, kv_pages,
                                            metadata, backend)
        x = x + self.post_attention_layernorm(attn_out)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, kv_pages


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3's text decoder. Its checkpoint is the Llama family's (q/k norms, tied output)
    plus the norms around the MLP."""

    architectures = {"Gemma3ForCausalLM": "gemma3_text"}
    hf_config_aliases = {"hidden_act": "hidden_activation"}
    hf_config_defaults = {"tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
                          "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
                          "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0}
    qk_norm = True
    rope_scaling_extends_context = False  # 12B-27B: 131,072 positions, rope_scaling factor 8

    @classmethod
    def adapt_hf_config(cls, hf: dict[str, Any]) -> dict[str, Any]:
        hf = super().adapt_hf_config(hf)
        if hf.get("layer_types") is None:
            # Configs written before transformers listed layer_types: every
            # sliding_window_pattern-th layer is global, the others local.
            every = hf.get("sliding_window_pattern", 6)
            hf["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                                 for i in range(hf["num_hidden_layers"])]
        return hf

    def __init__(self, config: ModelConfig, dtype: Any = jnp.bfloat16, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.embed_tokens = init_param((config.vocab_size, config.hidden_size), ("vocab", "embed"),
                                       dtype, rngs, 1.0)
        self.layers = nnx.List([Gemma3DecoderLayer(config, i, dtype, rngs)
                                for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, unit_offset=True)
        self.lm_head = None  # tied
        self.inv_freq = nnx.Variable(jnp.asarray(self.rope_inv_freq(config)))
        self.local_inv_freq = nnx.Variable(jnp.asarray(self.local_rope_inv_freq(config)))

    @staticmethod
    def local_rope_inv_freq(config: ModelConfig) -> np.ndarray:
        """The sliding-window layers' rotary frequencies: their own base, no scaling."""
        return rope_inv_freq(config.head_dim, config.rope_local_theta, None)

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_caches: list[jax.Array],
                 metadata: AttentionMetadata,
                 backend: AttentionBackend) -> tuple[jax.Array, list[jax.Array]]:
        embed = self.embed_tokens[...]
        x = embed[token_ids] * jnp.asarray(math.sqrt(self.config.hidden_size), embed.dtype)
        new_caches = []
        for layer, kv_pages in zip(self.layers, kv_caches):
            local = layer.self_attn.sliding_window is not None
            inv_freq = (self.local_inv_freq if local else self.inv_freq)[...]
            x, kv_pages = call_layer(layer, x, kv_pages, metadata, positions, inv_freq,
                                     backend=backend)
            new_caches.append(kv_pages)
        return self.norm(x), new_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap

    @classmethod
    def checkpoint_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        shapes = super().checkpoint_shapes(config)
        for i in range(config.num_layers):
            for norm in _NORMS[2:]:
                shapes[f"model.layers.{i}.{norm}.weight"] = (config.hidden_size,)
        return shapes

    @classmethod
    def state_from_checkpoint(cls, config: ModelConfig,
                              hf: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        yield from super().state_from_checkpoint(config, hf)
        yield "local_inv_freq", cls.local_rope_inv_freq(config)
        for i in range(config.num_layers):
            for norm in _NORMS[2:]:
                yield f"layers/{i}/{norm}/weight", hf[f"model.layers.{i}.{norm}.weight"]
