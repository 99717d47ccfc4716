"""Falcon: rotary attention with one fused Q/K/V per KV head group (multi-query in Falcon-7B;
grouped KV heads in the new decoder architecture of Falcon-40B/180B), attention and MLP in
parallel on one (or, new architecture, two) LayerNorm of the layer's input, a GELU MLP, tied
output embeddings. Falcon-RW positions tokens with ALiBi biases instead of rotary embeddings."""

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
from pjllm.models.checkpoint import layer_norm_state, layer_norm_shapes, linear_shapes
from pjllm.models.layers import (MLP, AttentionBackend, LayerNorm, activation, alibi_slopes,
                                 init_param, run_layers, tied_logits)
from pjllm.models.llama import Attention, LlamaForCausalLM


def _layer_norms(config: ModelConfig) -> tuple[str, ...]:
    """The layer's LayerNorms by checkpoint name: the new architecture's two (attention, MLP),
    else one shared by parallel attention and MLP, else one before each."""
    if config.parallel_norms == 2:
        return ("ln_attn", "ln_mlp")
    return ("input_layernorm",) if config.parallel_residual else ("input_layernorm",
                                                                   "post_attention_layernorm")


class FalconDecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        embed, eps = config.hidden_size, config.layer_norm_eps
        self.norm_names = _layer_norms(config)
        self.parallel = config.parallel_residual
        for name in self.norm_names:
            setattr(self, name, LayerNorm(embed, eps, dtype))
        self.self_attention = Attention(config, dtype, rngs)
        self.mlp = MLP(embed, config.intermediate_size, dtype, rngs,
                       activation=activation(config.hidden_act), bias=config.attention_bias)

    def __call__(self, x, kv_pages, metadata, positions, inv_freq, slopes, *, backend):
        attn_in = getattr(self, self.norm_names[0])(x)
        attn_out, kv_pages = self.self_attention(attn_in, positions, inv_freq, kv_pages, metadata,
                                                 backend, alibi_slopes=slopes)
        if not self.parallel:
            x = x + attn_out
            return x + self.mlp(getattr(self, self.norm_names[1])(x)), kv_pages
        mlp_in = getattr(self, self.norm_names[-1])(x) if len(self.norm_names) == 2 else attn_in
        return x + attn_out + self.mlp(mlp_in), kv_pages


class FalconForCausalLM(CausalLM):
    architectures = {"FalconForCausalLM": "falcon"}
    hf_config_aliases = {"attention_bias": "bias", "intermediate_size": "ffn_hidden_size",
                         "hidden_act": "activation", "use_parallel_residual": "parallel_attn"}
    hf_config_defaults = {"tie_word_embeddings": True, "layer_norm_epsilon": 1e-5,
                          "activation": "gelu", "bias": False, "parallel_attn": True,
                          "max_position_embeddings": 2048, "rope_theta": 10000.0}
    base_model_prefix = "transformer"
    rope_inv_freq = staticmethod(LlamaForCausalLM.rope_inv_freq)

    @classmethod
    def adapt_hf_config(cls, hf: dict[str, Any]) -> dict[str, Any]:
        hf = super().adapt_hf_config(hf)
        if hf.get("new_decoder_architecture"):
            hf["num_key_value_heads"] = hf["num_kv_heads"]
            hf["use_parallel_residual"] = True
            if hf.get("num_ln_in_parallel_attn") == 1:
                raise ValueError("Falcon's new decoder architecture with one LayerNorm "
                                 "(num_ln_in_parallel_attn=1) is not supported")
            hf["num_ln_in_parallel_attn"] = 2
        else:
            hf["num_ln_in_parallel_attn"] = 1
            hf["num_key_value_heads"] = 1 if hf.get("multi_query", True) else hf["num_attention_heads"]
        return hf

    def __init__(self, config: ModelConfig, dtype: Any = jnp.bfloat16, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        embed = config.hidden_size
        self.word_embeddings = init_param((config.vocab_size, embed), ("vocab", "embed"), dtype,
                                          rngs, 1.0)
        self.h = nnx.List([FalconDecoderLayer(config, dtype, rngs) for _ in range(config.num_layers)])
        self.ln_f = LayerNorm(embed, config.layer_norm_eps, dtype)
        self.positions = nnx.Variable(jnp.asarray(self.position_table(config)))

    @classmethod
    def position_table(cls, config: ModelConfig) -> np.ndarray:
        """What positions the tokens: rotary frequencies, or (Falcon-RW) the ALiBi slopes.

        transformers scales Falcon's ALiBi bias by the softmax scale along with the scores, so
        the slopes carry it. (It also rounds the bias to bfloat16, where this keeps float32, as
        vLLM does: the two agree exactly while slope * position is a bfloat16, e.g. with at most
        8 heads, whose slopes are powers of two, over fewer than 256 positions.)"""
        if config.alibi:
            return alibi_slopes(config.num_heads) * np.float32(config.head_dim ** -0.5)
        return cls.rope_inv_freq(config)

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_caches: list[jax.Array],
                 metadata: AttentionMetadata,
                 backend: AttentionBackend) -> tuple[jax.Array, list[jax.Array]]:
        table = self.positions[...]
        inv_freq, slopes = (None, table) if self.config.alibi else (table, None)
        x, kv_caches = run_layers(self.h, self.word_embeddings[...][token_ids], kv_caches, metadata,
                                  positions, inv_freq, slopes, backend=backend)
        return self.ln_f(x), kv_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        return tied_logits(hidden, self.word_embeddings[...])

    @classmethod
    def checkpoint_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        embed, inner = config.hidden_size, config.intermediate_size
        qkv_rows = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        shapes = {"transformer.word_embeddings.weight": (config.vocab_size, embed),
                  **layer_norm_shapes("transformer.", ("ln_f",), embed)}
        for i in range(config.num_layers):
            p = f"transformer.h.{i}."
            shapes.update(layer_norm_shapes(p, _layer_norms(config), embed))
            shapes.update(linear_shapes(p, {"self_attention.query_key_value": (qkv_rows, embed),
                                            "self_attention.dense": (embed, embed),
                                            "mlp.dense_h_to_4h": (inner, embed),
                                            "mlp.dense_4h_to_h": (embed, inner)},
                                        bias=config.attention_bias))
        return shapes

    @classmethod
    def state_from_checkpoint(cls, config: ModelConfig,
                              hf: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        embed, heads, kv_heads = config.hidden_size, config.num_heads, config.num_kv_heads
        head_dim, group = config.head_dim, heads // kv_heads
        yield "word_embeddings", hf["transformer.word_embeddings.weight"]
        yield "positions", cls.position_table(config)
        yield from layer_norm_state(hf, "", "transformer.", ("ln_f",))
        for i in range(config.num_layers):
            p, q = f"transformer.h.{i}.", f"h/{i}/"
            yield from layer_norm_state(hf, q, p, _layer_norms(config))
            attn = p + "self_attention."
            # query_key_value's rows, per KV head: its group's queries, its key, its value
            # (multi-query: one KV head; MHA: groups of one) -> [embed, Hkv, G + 2, D].
            yield q + "self_attention/qkv_proj/kernel", hf[
                attn + "query_key_value.weight"].T.reshape(embed, kv_heads, group + 2, head_dim)
            yield q + "self_attention/o_proj/kernel", hf[attn + "dense.weight"].T.reshape(
                heads, head_dim, embed)
            yield q + "mlp/up_proj/kernel", hf[p + "mlp.dense_h_to_4h.weight"].T
            yield q + "mlp/down_proj/kernel", hf[p + "mlp.dense_4h_to_h.weight"].T
            if config.attention_bias:
                yield q + "self_attention/qkv_proj/bias", hf[
                    attn + "query_key_value.bias"].reshape(kv_heads, group + 2, head_dim)
                yield q + "self_attention/o_proj/bias", hf[attn + "dense.bias"]
                yield q + "mlp/up_proj/bias", hf[p + "mlp.dense_h_to_4h.bias"]
                yield q + "mlp/down_proj/bias", hf[p + "mlp.dense_4h_to_h.bias"]
