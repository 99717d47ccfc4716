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
LOG2E = 1.4426950408889634


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
                              sm_scale: float, sliding_window: int | None = None,
                              alibi_slopes: jax.Array | None = None) -> jax.Array:
    """Causal attention of each query token over its sequence's paged context.

    q: [T, Hq, D]; kv_pages: [2, Hkv, P, page_size, D]. Returns [T, Hq, D] in q.dtype; padding
    tokens (past query_start_loc[N]) give zeros. Loops over the pages that cover the batch's
    longest context, a few at a time (online softmax in float32), gathering each token's pages
    per step: peak memory O(T * pages per step * page_size * Hkv * D), never the whole context.
    With a sliding_window each token sees itself and the sliding_window - 1 keys before it, and
    the loop starts at the earliest window of the batch. alibi_slopes f32[Hq] (ALiBi) adds
    slope * (key position - query position) to each score.
    """
    out = combine_partials(*paged_attention_partials_reference(
        q, kv_pages, metadata, sm_scale=sm_scale, sliding_window=sliding_window,
        alibi_slopes=alibi_slopes), q.dtype)
    return out.reshape(q.shape)


def paged_attention_partials_reference(q: jax.Array, kv_pages: jax.Array,
                                       metadata: AttentionMetadata, *, sm_scale: float,
                                       sliding_window: int | None = None,
                                       alibi_slopes: jax.Array | None = None
                                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """paged_attention_reference's unnormalised softmax state, for `combine_partials`: acc
    [1, T * Hq, D], m [1, T * Hq] (log2 units), l [1, T * Hq] (rows are (token, head) pairs)."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = kv_pages.shape
    group = num_q_heads // num_kv_heads
    max_pages = metadata.block_tables.shape[1]
    pages_per_step = max(1, min(_CONTEXT_PAGES_PER_STEP,
                                _TOKENS_FOR_ONE_PAGE_PER_STEP // num_tokens))
    chunk = pages_per_step * page_size
    seq, pos, _ = token_layout(metadata, num_tokens)
    tables = metadata.block_tables.astype(jnp.int32)[seq]              # [T, W]
    # Heads lead (batch dimensions of the matmuls below, in the order the gathers produce them).
    # Gathering (kv head, page) tiles gives [Hkv, T, C, page_size, D] at once, where indexing
    # the page axis alone needed a transposing copy of K and of V. Index kv_pages itself: rows
    # of a reshaped view made XLA:CPU copy the whole cache twice a layer in 1-token steps,
    # whose KV write is a dynamic-update-slice (tests/engine/test_step_program.py).
    heads = jnp.arange(num_kv_heads, dtype=jnp.int32)[:, None, None]
    num_steps = (jnp.max(pos) + chunk) // chunk                        # chunks covering max(pos)+1
    first_step = 0
    if sliding_window is not None:  # the chunk holding the earliest key any token sees
        earliest = jnp.min(jnp.where(pos >= 0, pos, jnp.iinfo(jnp.int32).max)) - sliding_window + 1
        first_step = jnp.clip(earliest, 0, None) // chunk
    step_pages = jnp.arange(pages_per_step, dtype=jnp.int32)

    def keys(j):
        # Past a table's width the last entry repeats; those keys lie past every position.
        pages = tables[:, jnp.minimum(j * pages_per_step + step_pages, max_pages - 1)]  # [T, C]
        shape = (num_kv_heads, num_tokens, chunk, head_dim)
        key_pos = (j * chunk + jnp.arange(chunk))[None, :]
        visible = key_pos <= pos[:, None]                                  # [T, chunk]
        if sliding_window is not None:
            visible &= key_pos > pos[:, None] - sliding_window
        return (kv_pages[0, heads, pages[None]].reshape(shape),
                kv_pages[1, heads, pages[None]].reshape(shape), visible)

    def alibi_bias(j):  # [Hkv, T, G, chunk]
        slopes = alibi_slopes.astype(jnp.float32).reshape(num_kv_heads, 1, group, 1)
        distance = (j * chunk + jnp.arange(chunk))[None, :] - pos[:, None]
        return slopes * distance[None, :, None, :].astype(jnp.float32)

    return _online_softmax(q, keys, num_steps, "htpd", sm_scale=sm_scale, first_step=first_step,
                           bias=None if alibi_slopes is None else alibi_bias)


def prefix_attention_partials_reference(q: jax.Array, kv_pages: jax.Array, prefix_pages: jax.Array,
                                        prefix_len: jax.Array, num_query_tokens: jax.Array, *,
                                        sm_scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Every query token's attention over one shared prefix, no causal mask (the prefix lies
    before every query token): the common-prefix half of cascade attention.

    q: [T, Hq, D]; prefix_pages: [W] page ids, whose first prefix_len tokens are the prefix;
    tokens from num_query_tokens on are padding (no keys). Returns partials as
    paged_attention_partials_reference does. The prefix's pages are gathered once per step for
    all T tokens.
    """
    num_tokens = q.shape[0]
    _, num_kv_heads, _, page_size, head_dim = kv_pages.shape
    chunk_pages = _CONTEXT_PAGES_PER_STEP
    chunk = chunk_pages * page_size
    width = prefix_pages.shape[0]
    real = jnp.arange(num_tokens) < num_query_tokens                    # [T]

    def keys(j):
        pages = prefix_pages[jnp.minimum(j * chunk_pages + jnp.arange(chunk_pages), width - 1)]
        shape = (num_kv_heads, chunk, head_dim)
        visible = (j * chunk + jnp.arange(chunk)) < prefix_len           # [chunk]
        return (kv_pages[0][:, pages].reshape(shape), kv_pages[1][:, pages].reshape(shape),
                real[:, None] & visible[None, :])

    return _online_softmax(q, keys, (prefix_len + chunk - 1) // chunk, "hpd", sm_scale=sm_scale)


def _online_softmax(q: jax.Array, keys, num_steps: jax.Array, kv_spec: str, *,
                    sm_scale: float, first_step: jax.Array | int = 0, bias=None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online softmax of q [T, Hq, D] over key chunks [first_step, num_steps): keys(j) gives
    chunk j's K and V (laid out as kv_spec: per token "htpd" or shared "hpd") and its mask
    [T, chunk]; bias(j), if given, is added to chunk j's scores [Hkv, T, G, chunk]. Returns
    (acc [1, T * Hq, D], m [1, T * Hq] in log2 units, l [1, T * Hq])."""
    num_tokens, num_q_heads, head_dim = q.shape
    k0, _, _ = jax.eval_shape(keys, 0)
    num_kv_heads = k0.shape[0]
    group = num_q_heads // num_kv_heads
    qf = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * sm_scale
    qf = jnp.swapaxes(qf, 0, 1)                                         # [Hkv, T, G, D]

    def body(j, carry):
        m, l, acc = carry
        k, v, mask = keys(j)
        s = jnp.einsum(f"htgd,{kv_spec}->htgp", qf, k.astype(jnp.float32))  # [Hkv, T, G, chunk]
        if bias is not None:
            s = s + bias(j)
        mask = mask[None, :, None, :]
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + jnp.einsum(f"htgp,{kv_spec}->htgd", p,
                                                  v.astype(jnp.float32))
        return m_new, l, acc

    init = (jnp.full((num_kv_heads, num_tokens, group), MASK_VALUE, jnp.float32),
            jnp.zeros((num_kv_heads, num_tokens, group), jnp.float32),
            jnp.zeros((num_kv_heads, num_tokens, group, head_dim), jnp.float32))
    m, l, acc = lax.fori_loop(first_step, num_steps, body, init)
    rows = num_tokens * num_q_heads  # [Hkv, T, G, ...] -> rows (token, head)
    return (jnp.swapaxes(acc, 0, 1).reshape(1, rows, head_dim),
            jnp.swapaxes(m * LOG2E, 0, 1).reshape(1, rows), jnp.swapaxes(l, 0, 1).reshape(1, rows))


def combine_partials(acc: jax.Array, m: jax.Array, l: jax.Array, dtype) -> jax.Array:
    """Merges softmax partials over disjoint key sets -- acc [S, R, D] (unnormalised), m [S, R]
    (running max, log2 units), l [S, R] (sum of exponentials) -- into normalised rows [R, D] in
    `dtype`, zeros where no part saw a key."""
    m_all = jnp.max(m, axis=0)
    w = jnp.exp2(m - m_all[None])                                           # [S, R]
    denom = jnp.sum(w * l, axis=0)
    out = jnp.sum(w[..., None] * acc, axis=0) / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.astype(dtype)


def paged_attention_dense(q: jax.Array, kv_pages: jax.Array, metadata: AttentionMetadata, *,
                          sm_scale: float, sliding_window: int | None = None,
                          alibi_slopes: jax.Array | None = None) -> jax.Array:
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
    key_pos = jnp.arange(ctx.shape[3])[None, :]
    if alibi_slopes is not None:
        s = s + (alibi_slopes.reshape(num_kv_heads, group)[None, :, :, None]
                 * (key_pos - pos[:, None])[:, None, None, :])
    mask = key_pos <= pos[:, None]                                     # [T, W*ps]
    if sliding_window is not None:
        mask &= key_pos > pos[:, None] - sliding_window
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(valid[:, None, None, None], p, 0.0)
    out = jnp.einsum("thgk,htkd->thgd", p, ctx[1])
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)

