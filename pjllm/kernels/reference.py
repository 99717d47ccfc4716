"""Pure-jnp paged attention: the oracle for the Pallas kernels, and the fast path on CPU.

KV page layout (one array per layer, owned by pjllm.kernels):

    kv_pages: [2, num_kv_heads, num_pages, page_size, head_dim]   index 0 = K, 1 = V

A token whose slot is `s` lives at page `s // page_size`, row `s % page_size`. One (kv head, page)
tile of K (or V) is a contiguous [page_size, head_dim] block, which is what the kernels load.

Shapes below: T = token bucket, N = sequence bucket, W = max pages per sequence,
Hq / Hkv = query / kv heads, D = head_dim, G = Hq // Hkv (query heads per kv head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pjllm.kernels.attention_metadata import AttentionMetadata

# Finite "minus infinity": keeps exp(m_old - m_new) well defined when a row has seen no key yet.
MASK_VALUE = -1e30


def write_kv_reference(kv_pages: jax.Array, k: jax.Array, v: jax.Array,
                       slot_mapping: jax.Array) -> jax.Array:
    """Writes each token's K and V into its slot; slot -1 (padding) writes nothing.

    kv_pages: [2, Hkv, P, page_size, D]; k, v: [T, Hkv, D]; slot_mapping: [T] int32.
    Returns the updated kv_pages (same shape and dtype; in place when the input is donated).
    """
    _, _, num_pages, page_size, _ = kv_pages.shape
    slot = slot_mapping.astype(jnp.int32)
    # -1 // page_size would wrap to the last page: send padding past the end, where "drop" ignores
    # it, each to its own out-of-range page so that the indices stay unique.
    pad_page = num_pages + jnp.arange(slot.shape[0], dtype=jnp.int32)
    page = jnp.where(slot >= 0, slot // page_size, pad_page)
    row = jnp.where(slot >= 0, slot % page_size, 0)
    kv = jnp.stack([k, v]).astype(kv_pages.dtype)          # [2, T, Hkv, D]
    kv = jnp.swapaxes(kv, 1, 2)                             # [2, Hkv, T, D]
    return kv_pages.at[:, :, page, row].set(kv, mode="drop", unique_indices=True)


def token_layout(metadata: AttentionMetadata,
                 num_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token sequence id, absolute position, and validity of a ragged batch.

    Returns (seq [T] int32 clipped to [0, N), pos [T] int32 (-1 for padding), valid [T] bool).
    """
    qsl = metadata.query_start_loc.astype(jnp.int32)
    n = qsl.shape[0] - 1
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(qsl[1:], t, side="right").astype(jnp.int32)
    valid = t < qsl[n]
    seq = jnp.minimum(seq, n - 1)
    q_len = qsl[seq + 1] - qsl[seq]
    pos = metadata.seq_lens.astype(jnp.int32)[seq] - q_len + (t - qsl[seq])
    pos = jnp.where(valid, pos, -1)
    return seq, pos, valid


# Pages of context each step of the reference's loop reads per token. A decode's steps are small,
# so their fixed cost counts: on CPU, 4 pages a step read a 1000-token context about 20% faster
# than one page (the same at 134 tokens); a prefill's many tokens make each step large already,
# and its gather grows with tokens x pages.
_CONTEXT_PAGES_PER_STEP = 4
_TOKENS_FOR_ONE_PAGE_PER_STEP = 64


def paged_attention_reference(q: jax.Array, kv_pages: jax.Array, metadata: AttentionMetadata, *,
                              sm_scale: float) -> jax.Array:
    """Causal attention of each query token over its sequence's paged context.

    q: [T, Hq, D]; kv_pages: [2, Hkv, P, page_size, D]. Returns [T, Hq, D] in q.dtype; padding
    tokens (past query_start_loc[N]) give zeros. Loops over the pages that cover the batch's
    longest context, a few at a time (online softmax in float32), gathering each token's pages
    per step: peak memory O(T * pages per step * page_size * Hkv * D), never the whole context.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = kv_pages.shape
    group = num_q_heads // num_kv_heads
    max_pages = metadata.block_tables.shape[1]
    pages_per_step = max(1, min(_CONTEXT_PAGES_PER_STEP,
                                _TOKENS_FOR_ONE_PAGE_PER_STEP // num_tokens))
    chunk = pages_per_step * page_size
    seq, pos, valid = token_layout(metadata, num_tokens)
    tables = metadata.block_tables.astype(jnp.int32)[seq]              # [T, W]
    # Heads lead (batch dimensions of the matmuls below, in the order the gathers produce them).
    qf = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * sm_scale
    qf = jnp.swapaxes(qf, 0, 1)                                         # [Hkv, T, G, D]
    # Gathering (kv head, page) tiles gives [Hkv, T, C, page_size, D] at once, where indexing
    # the page axis alone needed a transposing copy of K and of V. Index kv_pages itself: rows
    # of a reshaped view made XLA:CPU copy the whole cache twice a layer in 1-token steps,
    # whose KV write is a dynamic-update-slice (tests/engine/test_step_program.py).
    heads = jnp.arange(num_kv_heads, dtype=jnp.int32)[:, None, None]
    num_steps = (jnp.max(pos) + chunk) // chunk                        # chunks covering max(pos)+1
    offsets = jnp.arange(chunk, dtype=jnp.int32)
    step_pages = jnp.arange(pages_per_step, dtype=jnp.int32)

    def body(j, carry):
        m, l, acc = carry
        # Past a table's width the last entry repeats; those keys lie past every position.
        pages = tables[:, jnp.minimum(j * pages_per_step + step_pages, max_pages - 1)]  # [T, C]
        shape = (num_kv_heads, num_tokens, chunk, head_dim)
        k = kv_pages[0, heads, pages[None]].reshape(shape).astype(jnp.float32)
        v = kv_pages[1, heads, pages[None]].reshape(shape).astype(jnp.float32)
        s = jnp.einsum("htgd,htpd->htgp", qf, k)                       # [Hkv, T, G, chunk]
        mask = (j * chunk + offsets)[None, :] <= pos[:, None]           # [T, chunk]
        mask = mask[None, :, None, :]
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + jnp.einsum("htgp,htpd->htgd", p, v)
        return m_new, l, acc

    init = (jnp.full((num_kv_heads, num_tokens, group), MASK_VALUE, jnp.float32),
            jnp.zeros((num_kv_heads, num_tokens, group), jnp.float32),
            jnp.zeros((num_kv_heads, num_tokens, group, head_dim), jnp.float32))
    _, l, acc = lax.fori_loop(0, num_steps, body, init)
    out = jnp.swapaxes(acc / jnp.where(l > 0, l, 1.0)[..., None], 0, 1)  # [T, Hkv, G, D]
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


def paged_attention_dense(q: jax.Array, kv_pages: jax.Array, metadata: AttentionMetadata, *,
                          sm_scale: float) -> jax.Array:
    """Obviously-correct version for tests: gathers every token's whole context [T, W*ps, Hkv, D].

    Same contract as paged_attention_reference. Small shapes only.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = kv_pages.shape
    group = num_q_heads // num_kv_heads
    seq, pos, valid = token_layout(metadata, num_tokens)
    tables = metadata.block_tables.astype(jnp.int32)[seq]              # [T, W]
    ctx = kv_pages[:, :, tables].astype(jnp.float32)                   # [2, Hkv, T, W, ps, D]
    ctx = ctx.reshape(2, num_kv_heads, num_tokens, -1, head_dim)       # [2, Hkv, T, W*ps, D]
    qf = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim)
    s = jnp.einsum("thgd,htkd->thgk", qf, ctx[0]) * sm_scale
    mask = jnp.arange(ctx.shape[3])[None, :] <= pos[:, None]           # [T, W*ps]
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(valid[:, None, None, None], p, 0.0)
    out = jnp.einsum("thgk,htkd->thgd", p, ctx[1])
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)

