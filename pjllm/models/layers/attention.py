"""The attention entry every family calls: write this step's K/V, attend over the paged cache."""

from __future__ import annotations

import jax

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
