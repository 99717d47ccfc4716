"""The Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5) as one Flax NNX model.

The engine splits the module into (graphdef, state) once and runs `forward` as a pure function of
the state inside `jax.jit`. Every parameter carries `logical_axes` metadata (`vocab`, `embed`,
`heads`, `kv_heads`, `qkv`, `head_dim`, `mlp`); sharding rules map those to mesh axes.
Q/K/V and gate/up projections are stored fused (one matmul each); `hf_to_state_arrays` fuses
HF's separate tensors at load.

Weights follow the `x @ kernel` convention: kernels are [in, out], HF's [out, in] transposed.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pjllm.config import ModelConfig
from pjllm.kernels import ops
from pjllm.kernels.attention_metadata import AttentionMetadata

_SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


def has_o_bias(config: ModelConfig) -> bool:
    return config.attention_bias and config.architecture != "Qwen2ForCausalLM"


def _param(shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any, rngs: nnx.Rngs,
           scale: float) -> nnx.Param:
    value = jax.random.normal(rngs.params(), shape, jnp.float32) * scale
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def _zeros(shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse rotary frequencies [head_dim // 2], with Llama-3 or linear scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; "
                         f"supported: {', '.join(_SUPPORTED_ROPE_TYPES)}")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling.get("low_freq_factor", 1.0)
        high_freq_factor = scaling.get("high_freq_factor", 4.0)
        old_context_len = scaling.get("original_max_position_embeddings", 8192)
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates x [T, H, D] by positions [T] in HF's half-split layout."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: Any):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    """GQA attention over the paged KV cache.

    Q, K and V come from one fused projection laid out per KV head: for each of the Hkv heads,
    its G = Hq / Hkv query heads, then its key, then its value ([embed, Hkv, G + 2, head_dim]).
    One matmul instead of three, and sharding the `kv_heads` axis splits it cleanly.
    """

    def __init__(self, config: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        embed, heads, kv_heads, head_dim = (config.hidden_size, config.num_heads,
                                            config.num_kv_heads, config.head_dim)
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.group = heads // kv_heads
        self.qkv_proj = _param((embed, kv_heads, self.group + 2, head_dim),
                               ("embed", "kv_heads", "qkv", "head_dim"), dtype, rngs,
                               1.0 / math.sqrt(embed))
        self.o_proj = _param((heads, head_dim, embed), ("heads", "head_dim", "embed"), dtype, rngs,
                             1.0 / math.sqrt(heads * head_dim))
        self.qkv_bias = _zeros((kv_heads, self.group + 2, head_dim), ("kv_heads", "qkv", "head_dim"),
                               dtype) if config.attention_bias else None
        # Llama's attention_bias also biases o_proj; Qwen2 biases only q/k/v.
        self.o_bias = _zeros((embed,), ("embed",), dtype) if has_o_bias(config) else None

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array, kv_pages: jax.Array,
                 metadata: AttentionMetadata, backend: str) -> tuple[jax.Array, jax.Array]:
        qkv = jnp.einsum("te,ekgd->tkgd", x, self.qkv_proj[...])
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias[...]
        num_tokens = x.shape[0]
        q = qkv[:, :, :self.group].reshape(num_tokens, self.num_heads, self.head_dim)
        k, v = qkv[:, :, self.group], qkv[:, :, self.group + 1]
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        kv_pages = ops.write_kv(kv_pages, k, v, metadata.slot_mapping)
        out = ops.paged_attention(q, kv_pages, metadata, sm_scale=self.head_dim ** -0.5,
                                  backend=backend)
        # One [T, Hq*D] x [Hq*D, E] matmul: given the 3-D einsum, XLA:CPU transposed the whole
        # o_proj weight to [D, Hq, E] in every step (a quarter of a CPU decode step).
        out = out.reshape(num_tokens, -1) @ self.o_proj[...].reshape(-1, self.o_proj.shape[-1])
        if self.o_bias is not None:
            out = out + self.o_bias[...]
        return out, kv_pages


class MLP(nnx.Module):
    """SwiGLU; gate and up projections fused into one [embed, 2, mlp] matmul."""

    def __init__(self, config: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        embed, mlp = config.hidden_size, config.intermediate_size
        self.gate_up_proj = _param((embed, 2, mlp), ("embed", None, "mlp"), dtype, rngs,
                                   1.0 / math.sqrt(embed))
        self.down_proj = _param((mlp, embed), ("mlp", "embed"), dtype, rngs, 1.0 / math.sqrt(mlp))

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = jnp.einsum("te,esm->tsm", x, self.gate_up_proj[...])
        return (jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]) @ self.down_proj[...]


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, positions, inv_freq, kv_pages, metadata, backend):
        attn_out, kv_pages = self.self_attn(self.input_layernorm(x), positions, inv_freq, kv_pages,
                                            metadata, backend)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_pages


@functools.partial(jax.jit, static_argnums=(0, 7))
def _decoder_layer(graphdef: nnx.GraphDef, state: nnx.State, x, positions, inv_freq, kv_pages,
                   metadata, backend):
    """One decoder layer as a pure function. Jitted so that inside the step's trace every layer
    after the first reuses the first one's jaxpr and lowering: tracing and lowering a step costs
    one layer, not num_layers (XLA inlines the calls, so the compiled program is unchanged)."""
    return nnx.merge(graphdef, state)(x, positions, inv_freq, kv_pages, metadata, backend)


class LlamaForCausalLM(nnx.Module):
    """Decoder-only transformer; `forward` maps a ragged token batch to hidden states."""

    def __init__(self, config: ModelConfig, dtype: Any = jnp.bfloat16, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.embed_tokens = _param((config.vocab_size, config.hidden_size), ("vocab", "embed"), dtype,
                                   rngs, 1.0)
        self.layers = nnx.List([DecoderLayer(config, dtype, rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _param((config.hidden_size, config.vocab_size), ("embed", "vocab"), dtype,
                                  rngs, 1.0 / math.sqrt(config.hidden_size))
        self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(config)))

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_caches: list[jax.Array],
                 metadata: AttentionMetadata, backend: str) -> tuple[jax.Array, list[jax.Array]]:
        """token_ids, positions: [T] -> (final hidden states [T, hidden], updated kv_caches)."""
        x = self.embed_tokens[...][token_ids]
        inv_freq = self.inv_freq[...]
        new_caches = []
        for layer, kv_pages in zip(self.layers, kv_caches):
            layer_graphdef, layer_state = nnx.split(layer)
            x, kv_pages = _decoder_layer(layer_graphdef, layer_state, x, positions, inv_freq, kv_pages,
                                         metadata, backend)
            new_caches.append(kv_pages)
        return self.norm(x), new_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [M, hidden] -> float32 logits [M, vocab]."""
        if self.lm_head is None:
            logits = jnp.einsum("me,ve->mv", hidden, self.embed_tokens[...])
        else:
            logits = hidden @ self.lm_head[...]
        return logits.astype(jnp.float32)


def hf_to_state_arrays(config: ModelConfig, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps an HF Llama/Mistral/Qwen2 state dict to this module's parameter paths and layouts.

    Keys of the result are '/'-joined NNX paths (e.g. 'layers/0/self_attn/q_proj'). A missing or
    misshaped tensor raises ValueError naming it.
    """
    heads, kv_heads, head_dim, embed = (config.num_heads, config.num_kv_heads, config.head_dim,
                                        config.hidden_size)

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in hf:
            raise ValueError(f"weights are missing tensor {name!r} (expected shape {shape})")
        value = hf[name]
        if tuple(value.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, expected {shape}")
        return value

    out = {"embed_tokens": take("model.embed_tokens.weight", (config.vocab_size, embed)),
           "norm/weight": take("model.norm.weight", (embed,))}
    if not config.tie_word_embeddings:
        out["lm_head"] = take("lm_head.weight", (config.vocab_size, embed)).T
    for i in range(config.num_layers):
        hf_prefix, prefix = f"model.layers.{i}.", f"layers/{i}/"
        attn = hf_prefix + "self_attn."
        group = heads // kv_heads
        q = take(attn + "q_proj.weight", (heads * head_dim, embed)).T.reshape(embed, kv_heads, group,
                                                                               head_dim)
        k = take(attn + "k_proj.weight", (kv_heads * head_dim, embed)).T.reshape(embed, kv_heads, 1,
                                                                                  head_dim)
        v = take(attn + "v_proj.weight", (kv_heads * head_dim, embed)).T.reshape(embed, kv_heads, 1,
                                                                                  head_dim)
        out[prefix + "self_attn/qkv_proj"] = np.concatenate([q, k, v], axis=2)
        out[prefix + "self_attn/o_proj"] = take(attn + "o_proj.weight", (embed, heads * head_dim)
                                                ).T.reshape(heads, head_dim, embed)
        if config.attention_bias:
            q_bias = take(attn + "q_proj.bias", (heads * head_dim,)).reshape(kv_heads, group, head_dim)
            k_bias = take(attn + "k_proj.bias", (kv_heads * head_dim,)).reshape(kv_heads, 1, head_dim)
            v_bias = take(attn + "v_proj.bias", (kv_heads * head_dim,)).reshape(kv_heads, 1, head_dim)
            out[prefix + "self_attn/qkv_bias"] = np.concatenate([q_bias, k_bias, v_bias], axis=1)
        if has_o_bias(config):
            out[prefix + "self_attn/o_bias"] = take(attn + "o_proj.bias", (embed,))
        mlp = hf_prefix + "mlp."
        mlp_shape = (config.intermediate_size, embed)
        out[prefix + "mlp/gate_up_proj"] = np.stack(
            [take(mlp + "gate_proj.weight", mlp_shape).T, take(mlp + "up_proj.weight", mlp_shape).T],
            axis=1)
        out[prefix + "mlp/down_proj"] = take(mlp + "down_proj.weight",
                                             (embed, config.intermediate_size)).T
        out[prefix + "input_layernorm/weight"] = take(hf_prefix + "input_layernorm.weight", (embed,))
        out[prefix + "post_attention_layernorm/weight"] = take(
            hf_prefix + "post_attention_layernorm.weight", (embed,))
    return out
