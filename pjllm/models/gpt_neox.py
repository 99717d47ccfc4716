"""GPT-NeoX / Pythia: the Llama family's attention with biases and rotary embeddings on part of
each head (rotary_pct), LayerNorm, a biased GELU MLP, and (use_parallel_residual) attention and
MLP side by side on the layer's input."""

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
from pjllm.models.layers import (MLP, AttentionBackend, LayerNorm, Linear, activation, init_param,
                                 run_layers)
from pjllm.models.llama import Attention, LlamaForCausalLM


_NORMS = ("input_layernorm", "post_attention_layernorm")


class GPTNeoXLayer(nnx.Module):
    def __init__(self, config: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        embed, eps = config.hidden_size, config.layer_norm_eps
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = LayerNorm(embed, eps, dtype)
        self.attention = Attention(config, dtype, rngs)
        self.post_attention_layernorm = LayerNorm(embed, eps, dtype)
        self.mlp = MLP(embed, config.intermediate_size, dtype, rngs,
                       activation=activation(config.hidden_act))

    def __call__(self, x, kv_pages, metadata, positions, inv_freq, *, backend):
        attn_out, kv_pages = self.attention(self.input_layernorm(x), positions, inv_freq, kv_pages,
                                            metadata, backend)
        if self.parallel_residual:
            return x + attn_out + self.mlp(self.post_attention_layernorm(x)), kv_pages
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), kv_pages


class GPTNeoXForCausalLM(CausalLM):
    architectures = {"GPTNeoXForCausalLM": "gpt_neox"}
    hf_config_aliases = {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"}
    hf_config_defaults = {"hidden_act": "gelu", "attention_bias": True,
                          "use_parallel_residual": True, "rotary_pct": 0.25,
                          "tie_word_embeddings": False}
    base_model_prefix = "gpt_neox"
    rope_inv_freq = staticmethod(LlamaForCausalLM.rope_inv_freq)

    def __init__(self, config: ModelConfig, dtype: Any = jnp.bfloat16, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        embed = config.hidden_size
        self.embed_in = init_param((config.vocab_size, embed), ("vocab", "embed"), dtype, rngs, 1.0)
        self.layers = nnx.List([GPTNeoXLayer(config, dtype, rngs) for _ in range(config.num_layers)])
        self.final_layer_norm = LayerNorm(embed, config.layer_norm_eps, dtype)
        self.embed_out = Linear((embed,), (config.vocab_size,), ("embed",), ("vocab",), dtype, rngs)
        self.inv_freq = nnx.Variable(jnp.asarray(self.rope_inv_freq(config)))

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_caches: list[jax.Array],
                 metadata: AttentionMetadata,
                 backend: AttentionBackend) -> tuple[jax.Array, list[jax.Array]]:
        x, kv_caches = run_layers(self.layers, self.embed_in[...][token_ids], kv_caches, metadata,
                                  positions, self.inv_freq[...], backend=backend)
        return self.final_layer_norm(x), kv_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        return self.embed_out(hidden).astype(jnp.float32)

    @classmethod
    def checkpoint_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        embed, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
        shapes = {"gpt_neox.embed_in.weight": (vocab, embed), "embed_out.weight": (vocab, embed),
                  **layer_norm_shapes("gpt_neox.", ("final_layer_norm",), embed)}
        for i in range(config.num_layers):
            p = f"gpt_neox.layers.{i}."
            shapes.update(layer_norm_shapes(p, _NORMS, embed))
            shapes.update(linear_shapes(p, {"attention.query_key_value": (3 * embed, embed),
                                            "attention.dense": (embed, embed),
                                            "mlp.dense_h_to_4h": (inner, embed),
                                            "mlp.dense_4h_to_h": (embed, inner)}))
        return shapes

    @classmethod
    def state_from_checkpoint(cls, config: ModelConfig,
                              hf: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        embed, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
        yield "embed_in", hf["gpt_neox.embed_in.weight"]
        yield "embed_out/kernel", hf["embed_out.weight"].T
        yield "inv_freq", cls.rope_inv_freq(config)
        yield from layer_norm_state(hf, "", "gpt_neox.", ("final_layer_norm",))
        for i in range(config.num_layers):
            p, q = f"gpt_neox.layers.{i}.", f"layers/{i}/"
            yield from layer_norm_state(hf, q, p, _NORMS)
            # query_key_value's rows are per head: its query, key and value -> [embed, H, 3, D].
            yield q + "attention/qkv_proj/kernel", hf[
                p + "attention.query_key_value.weight"].T.reshape(embed, heads, 3, head_dim)
            yield q + "attention/qkv_proj/bias", hf[
                p + "attention.query_key_value.bias"].reshape(heads, 3, head_dim)
            yield q + "attention/o_proj/kernel", hf[p + "attention.dense.weight"].T.reshape(
                heads, head_dim, embed)
            yield q + "attention/o_proj/bias", hf[p + "attention.dense.bias"]
            yield q + "mlp/up_proj/kernel", hf[p + "mlp.dense_h_to_4h.weight"].T
            yield q + "mlp/up_proj/bias", hf[p + "mlp.dense_h_to_4h.bias"]
            yield q + "mlp/down_proj/kernel", hf[p + "mlp.dense_4h_to_h.weight"].T
            yield q + "mlp/down_proj/bias", hf[p + "mlp.dense_4h_to_h.bias"]
