"""The one linear layer: where weight quantization and sharding will attach."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def init_param(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any, rngs: nnx.Rngs,
               scale: float) -> nnx.Param:
    """A parameter drawn from N(0, scale^2), tagged with its logical sharding axes and with the
    draw (`init_std`), which `load_format="dummy"` repeats one parameter at a time on the
    parameter's own shards."""
    return nnx.Param(draw_normal(rngs.params(), shape, dtype, scale), logical_axes=axes,
                     init_std=scale)


def draw_normal(key: jax.Array, shape: tuple[int, ...], dtype: Any, std: float) -> jax.Array:
    """N(0, std^2) values of `shape`, drawn in float32 and cast to `dtype`."""
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) over multi-axis inputs and outputs.

    The kernel is [*in_shape, *out_shape] (the `x @ kernel` convention: HF's [out, in] weights
    are transposed at load); x is [T, *in_shape] and y [T, *out_shape]. Fused projections keep
    their structure in the shape (Q/K/V as [embed, kv_heads, group + 2, head_dim]), so sharding
    an axis splits them cleanly, and still run as one 2-D matmul: XLA:CPU transposed a 3-D
    einsum's whole weight in every step.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 in_axes: tuple[str | None, ...], out_axes: tuple[str | None, ...], dtype: Any,
                 rngs: nnx.Rngs, bias: bool = False):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.kernel = init_param(self.in_shape + self.out_shape, tuple(in_axes) + tuple(out_axes),
                                 dtype, rngs, 1.0 / math.sqrt(math.prod(self.in_shape)))
        self.bias = (nnx.Param(jnp.zeros(self.out_shape, dtype), logical_axes=tuple(out_axes))
                     if bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        y = x.reshape(x.shape[0], -1) @ kernel.reshape(math.prod(self.in_shape), -1)
        y = y.reshape(x.shape[0], *self.out_shape)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def tied_logits(hidden: jax.Array, embedding: jax.Array) -> jax.Array:
    """Float32 logits [M, vocab] of hidden [M, embed] through a tied output layer: the token
    embedding [vocab, embed]."""
    return jnp.einsum("me,ve->mv", hidden, embedding).astype(jnp.float32)
