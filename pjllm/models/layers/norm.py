"""Normalization layers, computed in float32."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """x / rms(x) * weight over the last axis (of `dim` features); with `unit_offset` (Gemma)
    x / rms(x) * (1 + weight), whose weights start at zero."""

    def __init__(self, dim: int, eps: float, dtype: Any, axis_name: str | None = "embed",
                 unit_offset: bool = False):
        self.eps = eps
        self.unit_offset = unit_offset
        init = jnp.zeros if unit_offset else jnp.ones
        self.weight = nnx.Param(init((dim,), dtype), logical_axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.weight[...].astype(jnp.float32)
        if self.unit_offset:
            scale = scale + 1.0
        return (x32 * scale).astype(x.dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / std * weight + bias over the last axis."""

    def __init__(self, dim: int, eps: float, dtype: Any, axis_name: str | None = "embed"):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), logical_axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        x32 = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (x32 * self.weight[...].astype(jnp.float32)
                + self.bias[...].astype(jnp.float32)).astype(x.dtype)
