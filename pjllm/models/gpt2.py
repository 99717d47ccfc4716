"""GPT-2: learned absolute positions, LayerNorm, a GELU (tanh) MLP, biases everywhere, tied
embeddings, multi-head attention. Its checkpoints store Conv1D weights, already [in, out]."""

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
from pjllm.models.checkpoint import layer_norm_state, layer_norm_shapes
from pjllm.models.layers import (MLP, AttentionBackend, LayerNorm, Linear, activation, init_param,
                                 paged_attention, run_layers, tied_logits)


class GPT2Attention(nnx.Module):
    """Multi-head attention; Q/K/V one fused projection laid out per head ([embed, H, 3, D], as
    the Llama family's per KV head layout with groups of one)."""

    def __init__(self, config: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        embed, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
        self.num_heads, self.head_dim = heads, head_dim
        self.qkv_proj = Linear((embed,), (heads, 3, head_dim), ("embed",),
                               ("kv_heads", "qkv", "head_dim"), dtype, rngs, bias=True)
        self.o_proj = Linear((heads, head_dim), (embed,), ("heads", "head_dim"), ("embed",), dtype,
                             rngs, bias=True)

    def __call__(self, x: jax.Array, kv_pages: jax.Array, metadata: AttentionMetadata, *,
                 backend: AttentionBackend) -> tuple[jax.Array, jax.Array]:
        qkv = self.qkv_proj(x)
        out, kv_pages = paged_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], kv_pages, metadata,
                                        sm_scale=self.head_dim ** -0.5, backend=backend)
        return self.o_proj(out), kv_pages


class GPT2Block(nnx.Module):
    def __init__(self, config: ModelConfig, dtype: Any, rngs: nnx.Rngs):
        embed, eps = config.hidden_size, config.layer_norm_eps
        self.ln_1 = LayerNorm(embed, eps, dtype)
        self.attn = GPT2Attention(config, dtype, rngs)
        self.ln_2 = LayerNorm(embed, eps, dtype)
        self.mlp = MLP(embed, config.intermediate_size, dtype, rngs,
                       activation=activation(config.hidden_act))

    def __call__(self, x, kv_pages, metadata, *, backend):
        attn_out, kv_pages = self.attn(self.ln_1(x), kv_pages, metadata, backend=backend)
        x = x + attn_out
        return x + self.mlp(self.ln_2(x)), kv_pages


class GPT2LMHeadModel(CausalLM):
    """GPT-2; the output layer is the token embedding (tied)."""

    architectures = {"GPT2LMHeadModel": "gpt2"}
    hf_config_aliases = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                         "num_attention_heads": "n_head", "max_position_embeddings": "n_positions",
                         "intermediate_size": "n_inner", "hidden_act": "activation_function"}
    hf_config_defaults = {"tie_word_embeddings": True, "layer_norm_epsilon": 1e-5,
                          "activation_function": "gelu_new"}
    base_model_prefix = "transformer"

    def __init__(self, config: ModelConfig, dtype: Any = jnp.bfloat16, rngs: nnx.Rngs | None = None):
        if not config.tie_word_embeddings:
            raise ValueError("GPT2LMHeadModel ties its output layer to the token embedding; "
                             "tie_word_embeddings must be true")
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        embed = config.hidden_size
        self.wte = init_param((config.vocab_size, embed), ("vocab", "embed"), dtype, rngs, 1.0)
        self.wpe = init_param((config.max_position_embeddings, embed), (None, "embed"), dtype,
                              rngs, 0.1)
        self.h = nnx.List([GPT2Block(config, dtype, rngs) for _ in range(config.num_layers)])
        self.ln_f = LayerNorm(embed, config.layer_norm_eps, dtype)

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_caches: list[jax.Array],
                 metadata: AttentionMetadata,
                 backend: AttentionBackend) -> tuple[jax.Array, list[jax.Array]]:
        x = self.wte[...][token_ids] + self.wpe[...][positions]
        x, kv_caches = run_layers(self.h, x, kv_caches, metadata, backend=backend)
        return self.ln_f(x), kv_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        return tied_logits(hidden, self.wte[...])

    @classmethod
    def checkpoint_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        embed, inner = config.hidden_size, config.intermediate_size
        shapes = {"transformer.wte.weight": (config.vocab_size, embed),
                  "transformer.wpe.weight": (config.max_position_embeddings, embed),
                  **layer_norm_shapes("transformer.", ("ln_f",), embed)}
        for i in range(config.num_layers):
            p = f"transformer.h.{i}."
            shapes.update(layer_norm_shapes(p, ("ln_1", "ln_2"), embed))
            for name, (rows, cols) in (("attn.c_attn", (embed, 3 * embed)),
                                       ("attn.c_proj", (embed, embed)),
                                       ("mlp.c_fc", (embed, inner)), ("mlp.c_proj", (inner, embed))):
                shapes[f"{p}{name}.weight"] = (rows, cols)  # Conv1D: [in, out]
                shapes[f"{p}{name}.bias"] = (cols,)
        return shapes

    @classmethod
    def state_from_checkpoint(cls, config: ModelConfig,
                              hf: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        embed, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
        yield "wte", hf["transformer.wte.weight"]
        yield "wpe", hf["transformer.wpe.weight"]
        yield from layer_norm_state(hf, "", "transformer.", ("ln_f",))
        for i in range(config.num_layers):
            p, q = f"transformer.h.{i}.", f"h/{i}/"
            yield from layer_norm_state(hf, q, p, ("ln_1", "ln_2"))
            # c_attn's columns: all heads' queries, then keys, then values -> [embed, H, 3, D].
            yield q + "attn/qkv_proj/kernel", hf[p + "attn.c_attn.weight"].reshape(
                embed, 3, heads, head_dim).transpose(0, 2, 1, 3)
            yield q + "attn/qkv_proj/bias", hf[p + "attn.c_attn.bias"].reshape(
                3, heads, head_dim).transpose(1, 0, 2)
            yield q + "attn/o_proj/kernel", hf[p + "attn.c_proj.weight"].reshape(heads, head_dim,
                                                                                 embed)
            yield q + "attn/o_proj/bias", hf[p + "attn.c_proj.bias"]
            yield q + "mlp/up_proj/kernel", hf[p + "mlp.c_fc.weight"]
            yield q + "mlp/up_proj/bias", hf[p + "mlp.c_fc.bias"]
            yield q + "mlp/down_proj/kernel", hf[p + "mlp.c_proj.weight"]
            yield q + "mlp/down_proj/bias", hf[p + "mlp.c_proj.bias"]
