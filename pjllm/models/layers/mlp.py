"""Feed-forward blocks."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from flax import nnx

from pjllm.models.layers.linear import Linear

# transformers' activation names (`hidden_act`) -> functions.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function transformers calls `name`."""
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu. Gate and up are one fused
    [embed, mlp, 2] projection (the pair innermost, so that splitting `mlp` across devices
    leaves each device whole gate/up pairs, which its one 2-D matmul keeps together)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: Any, rngs: nnx.Rngs,
                 activation: Callable[[jax.Array], jax.Array] = jax.nn.silu):
        self.activation = activation
        self.gate_up_proj = Linear((hidden_size,), (intermediate_size, 2), ("embed",),
                                   ("mlp", None), dtype, rngs)
        self.down_proj = Linear((intermediate_size,), (hidden_size,), ("mlp",), ("embed",),
                                dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(self.activation(gate_up[..., 0]) * gate_up[..., 1])


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
