"""Feed-forward blocks."""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from pjllm.models.layers.linear import Linear


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu. Gate and up are one fused
    [embed, 2, mlp] projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: Any, rngs: nnx.Rngs,
                 activation: Callable[[jax.Array], jax.Array] = jax.nn.silu):
        self.activation = activation
        self.gate_up_proj = Linear((hidden_size,), (2, intermediate_size), ("embed",),
                                   (None, "mlp"), dtype, rngs)
        self.down_proj = Linear((intermediate_size,), (hidden_size,), ("mlp",), ("embed",),
                                dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(self.activation(gate_up[:, 0]) * gate_up[:, 1])


class MLP(nnx.Module):
    """down(act(up(x))), with biases (GPT-2, GPT-NeoX)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: Any, rngs: nnx.Rngs,
                 activation: Callable[[jax.Array], jax.Array], bias: bool = True):
        self.activation = activation
        self.up_proj = Linear((hidden_size,), (intermediate_size,), ("embed",), ("mlp",), dtype,
                              rngs, bias=bias)
        self.down_proj = Linear((intermediate_size,), (hidden_size,), ("mlp",), ("embed",),
                                dtype, rngs, bias=bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.activation(self.up_proj(x)))
