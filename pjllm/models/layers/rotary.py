"""Rotary position embeddings (HF's half-split layout) and their frequency scalings."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "dynamic", "yarn")


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The rope scaling type of an HF `rope_scaling` dict ("default" for none); refuses others."""
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return kind


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict[str, Any] | None) -> np.ndarray:
    """Inverse rotary frequencies [rotary_dim // 2] for base `theta`, with the checkpoint's rope
    scaling (HF `rope_scaling`: llama3, linear, dynamic or yarn) applied.

    dynamic (NTK) rescales the base for the longest context, original_max_position_embeddings x
    factor, once, as vLLM does: transformers rescales it per forward pass by the current length,
    which a paged cache of keys rotated in earlier steps cannot follow.
    """
    scaling = scaling or {}
    kind = rope_type(scaling)
    if kind == "dynamic":
        factor = scaling["factor"]
        theta = theta * (factor * factor - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    inv_freq = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    if kind == "yarn":
        return _yarn_inv_freq(inv_freq, rotary_dim, theta, scaling).astype(np.float32)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
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


def _yarn_inv_freq(inv_freq: np.ndarray, dim: int, theta: float,
                   scaling: dict[str, Any]) -> np.ndarray:
    """YaRN: the original frequencies for the dimensions that turn many times over the original
    context, the interpolated (divided by factor) ones for those that turn less than once, and a
    linear ramp between (transformers' and the paper's formulas)."""
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(
        scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """What YaRN multiplies cos and sin by (so q.k by its square): attention_factor, else from
    the factor (0.1 ln(factor) + 1, or mscale / mscale_all_dim's ratio); 1 for other types."""
    scaling = scaling or {}
    if rope_type(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]

    def mscale(scale: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"])
    return mscale()


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
               scale: float = 1.0) -> jax.Array:
    """Rotates x [T, H, D] by positions [T] in HF's half-split layout. With fewer frequencies
    than D / 2 (partial rotary, as GPT-NeoX's rotary_pct) only the first 2 * len(inv_freq)
    features rotate; the rest pass through. `scale` multiplies cos and sin (YaRN)."""
    rotary_dim = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, R/2]
    cos = (jnp.cos(angles) * scale)[:, None, :]
    sin = (jnp.sin(angles) * scale)[:, None, :]
    x1, x2 = jnp.split(x[..., :rotary_dim].astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    if rotary_dim == x.shape[-1]:
        return rotated
    return jnp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)
