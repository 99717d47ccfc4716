"""BLOOM: ALiBi position biases instead of position embeddings, a LayerNorm right after the
token embedding, LayerNorm layers, fused per-head Q/K/V, a GELU (tanh) MLP, biases everywhere,
tied output embeddings."""

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
from pjllm.models.layers import (MLP, AttentionBackend, LayerNorm, Linear, activation, alibi_slopes,
                                 init_param, paged_attention, run_layers, tied_logits)


_NORMS = ("input_layernorm", "post_attention_layernorm")


class BloomAttention(nnx.Module):
    def __init__(self, config: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        embed, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
        self.head_dim = head_dim
        self.query_key_value = Linear((embed,), (heads, 3, head_dim), ("embed",),
                                      ("kv_heads", "qkv", "head_dim"), dtype, rngs, bias=True)
        self.dense = Linear((heads, head_dim), (embed,), ("heads", "head_dim"), ("embed",), dtype,
                            rngs, bias=True)

    def __call__(self, x, kv_pages, metadata, slopes, *, backend):
        qkv = self.query_key_value(x)
        out, kv_pages = paged_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], kv_pages, metadata,
                                        sm_scale=self.head_dim ** -0.5, backend=backend,
                                        alibi_slopes=slopes)
        return self.dense(out), kv_pages


class BloomBlock(nnx.Module):
    def __init__(self, config: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        embed, eps = config.hidden_size, config.layer_norm_eps
        self.input_layernorm = LayerNorm(embed, eps, dtype)
        self.self_attention = BloomAttention(config, dtype, rngs)
        self.post_attention_layernorm = LayerNorm(embed, eps, dtype)
        self.mlp = MLP(embed, config.intermediate_size, dtype, rngs,
                       activation=activation(config.hidden_act))

    def __call__(self, x, kv_pages, metadata, slopes, *, backend):
        attn_out, kv_pages = self.self_attention(self.input_layernorm(x), kv_pages, metadata,
                                                 slopes, backend=backend)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), kv_pages


class BloomForCausalLM(CausalLM):
    architectures = {"BloomForCausalLM": "bloom"}
    hf_config_aliases = {"hidden_size": "n_embed", "num_hidden_layers": "n_layer",
                         "num_attention_heads": "n_head"}
    # ALiBi has no position table; BLOOM was trained on 2,048-token sequences.
    hf_config_defaults = {"alibi": True, "tie_word_embeddings": True, "layer_norm_epsilon": 1e-5,
                          "hidden_act": "gelu_pytorch_tanh", "max_position_embeddings": 2048}
    base_model_prefix = "transformer"

    def __init__(self, config: ModelConfig, dtype: Any = jnp.bfloat16, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        embed, eps = config.hidden_size, config.layer_norm_eps
        self.word_embeddings = init_param((config.vocab_size, embed), ("vocab", "embed"), dtype,
                                          rngs, 1.0)
        self.word_embeddings_layernorm = LayerNorm(embed, eps, dtype)
        self.h = nnx.List([BloomBlock(config, dtype, rngs) for _ in range(config.num_layers)])
        self.ln_f = LayerNorm(embed, eps, dtype)
        self.alibi_slopes = nnx.Variable(jnp.asarray(alibi_slopes(config.num_heads)))

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_caches: list[jax.Array],
                 metadata: AttentionMetadata,
                 backend: AttentionBackend) -> tuple[jax.Array, list[jax.Array]]:
        x = self.word_embeddings_layernorm(self.word_embeddings[...][token_ids])
        x, kv_caches = run_layers(self.h, x, kv_caches, metadata, self.alibi_slopes[...],
                                  backend=backend)
        return self.ln_f(x), kv_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        return tied_logits(hidden, self.word_embeddings[...])

    @classmethod
    def checkpoint_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        embed, inner = config.hidden_size, config.intermediate_size
        shapes = {"transformer.word_embeddings.weight": (config.vocab_size, embed),
                  **layer_norm_shapes("transformer.", ("word_embeddings_layernorm", "ln_f"), embed)}
        for i in range(config.num_layers):
            p = f"transformer.h.{i}."
            shapes.update(layer_norm_shapes(p, _NORMS, embed))
            shapes.update(linear_shapes(p, {"self_attention.query_key_value": (3 * embed, embed),
                                            "self_attention.dense": (embed, embed),
                                            "mlp.dense_h_to_4h": (inner, embed),
                                            "mlp.dense_4h_to_h": (embed, inner)}))
        return shapes

    @classmethod
    def state_from_checkpoint(cls, config: ModelConfig,
                              hf: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        embed, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
        yield "word_embeddings", hf["transformer.word_embeddings.weight"]
        yield "alibi_slopes", alibi_slopes(heads)
        yield from layer_norm_state(hf, "", "transformer.", ("word_embeddings_layernorm", "ln_f"))
        for i in range(config.num_layers):
            p, q = f"transformer.h.{i}.", f"h/{i}/"
            yield from layer_norm_state(hf, q, p, _NORMS)
            attn = p + "self_attention."
            # query_key_value's rows are per head: its query, key and value -> [embed, H, 3, D].
            yield q + "self_attention/query_key_value/kernel", hf[
                attn + "query_key_value.weight"].T.reshape(embed, heads, 3, head_dim)
            yield q + "self_attention/query_key_value/bias", hf[
                attn + "query_key_value.bias"].reshape(heads, 3, head_dim)
            yield q + "self_attention/dense/kernel", hf[attn + "dense.weight"].T.reshape(
                heads, head_dim, embed)
            yield q + "self_attention/dense/bias", hf[attn + "dense.bias"]
            yield q + "mlp/up_proj/kernel", hf[p + "mlp.dense_h_to_4h.weight"].T
            yield q + "mlp/up_proj/bias", hf[p + "mlp.dense_h_to_4h.bias"]
            yield q + "mlp/down_proj/kernel", hf[p + "mlp.dense_4h_to_h.weight"].T
            yield q + "mlp/down_proj/bias", hf[p + "mlp.dense_4h_to_h.bias"]
