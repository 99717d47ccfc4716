"""The attention entry every family calls: write this step's K/V, attend over the paged cache."""

from __future__ import annotations

import math

import jax
import numpy as np

from pjllm.kernels import ops
from pjllm.kernels.attention_metadata import AttentionMetadata


def paged_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_pages: jax.Array,
                    metadata: AttentionMetadata, *, sm_scale: float, backend: str,
                    sliding_window: int | None = None,
                    alibi_slopes: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Causal attention of this step's tokens over their sequences' paged KV.

    q: [T, Hq, D]; k, v: [T, Hkv, D] (positions already applied); kv_pages: one layer's cache
    [2, Hkv, P, page_size, D]. Returns (out [T, Hq, D], kv_pages with k and v written).
    `backend` is the engine's resolved attention backend ("reference" or "pallas");
    `sliding_window`, a windowed layer's window (each token sees itself and the
    sliding_window - 1 tokens before it); `alibi_slopes` f32[Hq], ALiBi position biases.
    """
    kv_pages = ops.write_kv(kv_pages, k, v, metadata.slot_mapping)
    out = ops.paged_attention(q, kv_pages, metadata, sm_scale=sm_scale, backend=backend,
                              sliding_window=sliding_window, alibi_slopes=alibi_slopes)
    return out, kv_pages


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes f32[num_heads] (Press et al.; BLOOM's and Falcon-RW's): a geometric
    sequence from 2^(-8/n) for the largest power of two n <= num_heads, then every other term of
    the sequence for 2n, for the heads past n."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** i for i in range(1, closest + 1)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** i for i in range(1, 2 * (num_heads - closest), 2)]
    return np.asarray(slopes, np.float32)
