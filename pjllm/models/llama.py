"""The Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5) as one Flax NNX model.

The engine splits the module into (graphdef, state) once and runs `forward` as a pure function of
the state inside `jax.jit`. Every parameter carries `logical_axes` metadata (`vocab`, `embed`,
`heads`, `kv_heads`, `qkv`, `head_dim`, `mlp`); sharding rules map those to mesh axes.
Q/K/V and gate/up projections are stored fused (one matmul each); `state_from_checkpoint` fuses
HF's separate tensors at load.

Weights follow the `x @ kernel` convention: kernels are [in, out], HF's [out, in] transposed.
Other families with the same decoder build on these classes (qwen3.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pjllm.config import ModelConfig
from pjllm.kernels.attention_metadata import AttentionMetadata
from pjllm.models.interface import CausalLM
from pjllm.models.layers import (AttentionBackend, GatedMLP, Linear, RMSNorm, activation,
                                 apply_rope, init_param, paged_attention, rope_attention_factor,
                                 rope_inv_freq, run_layers, tied_logits)


def has_o_bias(config: ModelConfig) -> bool:
    """Llama's attention_bias also biases o_proj; Qwen2 biases only q/k/v."""
    return config.attention_bias and config.architecture != "Qwen2ForCausalLM"


class Attention(nnx.Module):
    """GQA attention over the paged KV cache.

    Q, K and V come from one fused projection laid out per KV head: for each of the Hkv heads,
    its G = Hq / Hkv query heads, then its key, then its value ([embed, Hkv, G + 2, head_dim]).
    One matmul instead of three, and sharding the `kv_heads` axis splits it cleanly. With
    `qk_norm` (Qwen3, Gemma 3) each query and key head is RMS-normalised before rotary; with a
    `sliding_window` each token attends to itself and the sliding_window - 1 tokens before it.
    `sm_scale` overrides head_dim ** -0.5; `norm_unit_offset` makes the q/k norms Gemma's.
    Positions come from rotary embeddings (`inv_freq`) or, in ALiBi models, from per-head
    `alibi_slopes` biasing the scores instead.
    """

    def __init__(self, config: ModelConfig, dtype: Any, rngs: nnx.Rngs, qk_norm: bool = False,
                 sliding_window: int | None = None, sm_scale: float | None = None,
                 norm_unit_offset: bool = False):
        embed, heads, kv_heads, head_dim = (config.hidden_size, config.num_heads,
                                            config.num_kv_heads, config.head_dim)
        self.sliding_window = sliding_window
        self.sm_scale = sm_scale if sm_scale is not None else head_dim ** -0.5
        self.rope_scale = rope_attention_factor(config.rope_scaling)  # YaRN's; else 1
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.group = heads // kv_heads
        self.qkv_proj = Linear((embed,), (kv_heads, self.group + 2, head_dim), ("embed",),
                               ("kv_heads", "qkv", "head_dim"), dtype, rngs,
                               bias=config.attention_bias)
        self.o_proj = Linear((heads, head_dim), (embed,), ("heads", "head_dim"), ("embed",),
                             dtype, rngs, bias=has_o_bias(config))
        if qk_norm:
            self.q_norm, self.k_norm = (
                RMSNorm(head_dim, config.rms_norm_eps, dtype, "head_dim", norm_unit_offset)
                for _ in range(2))
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array | None,
                 kv_pages: jax.Array, metadata: AttentionMetadata, backend: AttentionBackend,
                 alibi_slopes: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        qkv = self.qkv_proj(x)
        num_tokens = x.shape[0]
        q = qkv[:, :, :self.group].reshape(num_tokens, self.num_heads, self.head_dim)
        k, v = qkv[:, :, self.group], qkv[:, :, self.group + 1]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if inv_freq is not None:
            q = apply_rope(q, positions, inv_freq, self.rope_scale)
            k = apply_rope(k, positions, inv_freq, self.rope_scale)
        out, kv_pages = paged_attention(q, k, v, kv_pages, metadata,
                                        sm_scale=self.sm_scale, backend=backend,
                                        sliding_window=self.sliding_window,
                                        alibi_slopes=alibi_slopes)
        return self.o_proj(out), kv_pages


class DecoderLayer(nnx.Module):
    """Pre-norm attention, then a pre-norm SwiGLU MLP, each added to the residual stream."""

    def __init__(self, config: ModelConfig, layer: int, dtype: Any, rngs: nnx.Rngs,
                 qk_norm: bool = False):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype, rngs, qk_norm=qk_norm,
                                   sliding_window=config.layer_window(layer))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, dtype, rngs,
                            activation=activation(config.hidden_act))

    def __call__(self, x, kv_pages, metadata, positions, inv_freq, *, backend):
        attn_out, kv_pages = self.self_attn(self.input_layernorm(x), positions, inv_freq, kv_pages,
                                            metadata, backend)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_pages


class LlamaForCausalLM(CausalLM):
    """Decoder-only transformer; `forward` maps a ragged token batch to hidden states.

    """

    # HF `architectures` names this class runs, each with its config.json `model_type`.
    architectures = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                     "Qwen2ForCausalLM": "qwen2"}
    qk_norm = False  # per-head q/k RMSNorm in every layer (Qwen3)

    def __init__(self, config: ModelConfig, dtype: Any = jnp.bfloat16, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.embed_tokens = init_param((config.vocab_size, config.hidden_size), ("vocab", "embed"),
                                       dtype, rngs, 1.0)
        self.layers = nnx.List([DecoderLayer(config, i, dtype, rngs, qk_norm=self.qk_norm)
                                for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear((config.hidden_size,), (config.vocab_size,), ("embed",),
                                  ("vocab",), dtype, rngs)
        self.inv_freq = nnx.Variable(jnp.asarray(self.rope_inv_freq(config)))

    @staticmethod
    def rope_inv_freq(config: ModelConfig) -> np.ndarray:
        """Rotary frequencies of the rotated part of each head (all of it but in GPT-NeoX)."""
        rotary_dim = int(config.head_dim * config.partial_rotary_factor)
        return rope_inv_freq(rotary_dim, config.rope_theta, config.rope_scaling)

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_caches: list[jax.Array],
                 metadata: AttentionMetadata,
                 backend: AttentionBackend) -> tuple[jax.Array, list[jax.Array]]:
        """token_ids, positions: [T] -> (final hidden states [T, hidden], updated kv_caches)."""
        x = self.embed_tokens[...][token_ids]
        x, kv_caches = run_layers(self.layers, x, kv_caches, metadata, positions,
                                  self.inv_freq[...], backend=backend)
        return self.norm(x), kv_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [M, hidden] -> float32 logits [M, vocab]."""
        if self.lm_head is None:
            return tied_logits(hidden, self.embed_tokens[...])
        return self.lm_head(hidden).astype(jnp.float32)

    @classmethod
    def checkpoint_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor of the family's transformers checkpoint for `config`, with its shape."""
        h, q_dim = config.hidden_size, config.num_heads * config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            for proj, rows in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
                shapes[f"{p}self_attn.{proj}.weight"] = (rows, h)
                if config.attention_bias:
                    shapes[f"{p}self_attn.{proj}.bias"] = (rows,)
            shapes[p + "self_attn.o_proj.weight"] = (h, q_dim)
            if has_o_bias(config):
                shapes[p + "self_attn.o_proj.bias"] = (h,)
            if cls.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (config.head_dim,)
                shapes[p + "self_attn.k_norm.weight"] = (config.head_dim,)
            for proj, shape in (("gate_proj", (config.intermediate_size, h)),
                                ("up_proj", (config.intermediate_size, h)),
                                ("down_proj", (h, config.intermediate_size))):
                shapes[f"{p}mlp.{proj}.weight"] = shape
        shapes["model.norm.weight"] = (h,)
        if not config.tie_word_embeddings:
            shapes["lm_head.weight"] = (config.vocab_size, h)
        return shapes

    @classmethod
    def state_from_checkpoint(cls, config: ModelConfig,
                              hf: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        """Maps a transformers state dict (as `checkpoint_shapes` lists it, shapes checked) to
        this module's state, one variable at a time: '/'-joined NNX paths (e.g.
        'layers/0/self_attn/qkv_proj/kernel') and arrays, Q/K/V and gate/up fused, rotary
        frequencies from the config."""
        heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        embed, group = config.hidden_size, heads // kv_heads
        yield "embed_tokens", hf["model.embed_tokens.weight"]
        yield "norm/weight", hf["model.norm.weight"]
        yield "inv_freq", cls.rope_inv_freq(config)
        if not config.tie_word_embeddings:
            yield "lm_head/kernel", hf["lm_head.weight"].T
        for i in range(config.num_layers):
            hf_prefix, prefix = f"model.layers.{i}.", f"layers/{i}/"
            attn = hf_prefix + "self_attn."
            yield prefix + "self_attn/qkv_proj/kernel", np.concatenate(
                [hf[attn + "q_proj.weight"].T.reshape(embed, kv_heads, group, head_dim),
                 hf[attn + "k_proj.weight"].T.reshape(embed, kv_heads, 1, head_dim),
                 hf[attn + "v_proj.weight"].T.reshape(embed, kv_heads, 1, head_dim)], axis=2)
            yield prefix + "self_attn/o_proj/kernel", hf[attn + "o_proj.weight"].T.reshape(
                heads, head_dim, embed)
            if config.attention_bias:
                yield prefix + "self_attn/qkv_proj/bias", np.concatenate(
                    [hf[attn + "q_proj.bias"].reshape(kv_heads, group, head_dim),
                     hf[attn + "k_proj.bias"].reshape(kv_heads, 1, head_dim),
                     hf[attn + "v_proj.bias"].reshape(kv_heads, 1, head_dim)], axis=1)
            if has_o_bias(config):
                yield prefix + "self_attn/o_proj/bias", hf[attn + "o_proj.bias"]
            if cls.qk_norm:
                yield prefix + "self_attn/q_norm/weight", hf[attn + "q_norm.weight"]
                yield prefix + "self_attn/k_norm/weight", hf[attn + "k_norm.weight"]
            mlp = hf_prefix + "mlp."
            yield prefix + "mlp/gate_up_proj/kernel", np.stack(
                [hf[mlp + "gate_proj.weight"].T, hf[mlp + "up_proj.weight"].T], axis=2)
            yield prefix + "mlp/down_proj/kernel", hf[mlp + "down_proj.weight"].T
            yield prefix + "input_layernorm/weight", hf[hf_prefix + "input_layernorm.weight"]
            yield (prefix + "post_attention_layernorm/weight",
                   hf[hf_prefix + "post_attention_layernorm.weight"])
