"""Ragged paged attention as a Pallas kernel (Triton lowering on GPU, interpret mode on CPU).

One kernel serves a flattened batch that mixes prefill chunks (many query tokens per sequence,
possibly starting at a cached offset) and decodes (one query token per sequence).

Work decomposition. Each sequence's query tokens are cut into blocks of `block_q` consecutive
tokens; a "work item" is one such block (it never straddles two sequences). The grid is
(work items, kv heads). A program loads the query rows of its block for all G query heads that
share its kv head -- rows are (token, head-in-group) pairs, `block_q * G_pad` of them -- and walks
the sequence's pages `block_kv` keys at a time with an online softmax, so each K/V tile is loaded
once for the whole GQA group. The number of work items depends on the data, so the grid is sized
by its static upper bound and surplus items do nothing.

Layout (see reference.py): kv_pages [2, Hkv, P, page_size, D]. The kernel views it as
[2, Hkv, P * page_size, D] (a free reshape) and gathers key rows `page * page_size + offset`
through the block table, so block_kv does not have to match page_size.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pjllm.kernels.attention_metadata import AttentionMetadata
from pjllm.kernels.reference import MASK_VALUE


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch parameters of one kernel instance.

    block_rows: query rows per program (tokens * padded group size), a power of 2 >= 16.
    block_kv:   keys per inner-loop step, a power of 2 >= 16.
    kv_splits:  programs sharing one work item's keys (flash-decoding), combined afterwards in
                jnp; None = chosen from the grid size so that small decode batches fill the GPU.
    """

    block_rows: int
    block_kv: int
    num_warps: int
    num_stages: int
    kv_splits: int | None = 1


# Tuned tiles, keyed by (mode, head_dim). mode is "decode" when the token bucket is no larger than
# the sequence bucket (at most about one query token per sequence), else "prefill".
# Chosen with `scripts/gpu_kernel_check.py --sweep` on an H200 (Llama-3-8B shapes, bf16, page 16);
# the alternatives measured within ~15% run-to-run noise of these. Unlisted shapes use _DEFAULT.
BLOCK_TABLE: dict[tuple[str, int], BlockConfig] = {
    ("decode", 64): BlockConfig(block_rows=16, block_kv=64, num_warps=4, num_stages=2,
                                kv_splits=None),
    ("decode", 128): BlockConfig(block_rows=16, block_kv=64, num_warps=4, num_stages=2,
                                 kv_splits=None),
    ("prefill", 64): BlockConfig(block_rows=64, block_kv=64, num_warps=4, num_stages=2),
    ("prefill", 128): BlockConfig(block_rows=64, block_kv=64, num_warps=4, num_stages=2),
}
_DEFAULT = {
    "decode": BlockConfig(block_rows=16, block_kv=64, num_warps=4, num_stages=2, kv_splits=None),
    "prefill": BlockConfig(block_rows=64, block_kv=32, num_warps=4, num_stages=2),
}
# Split-KV aims for at least this many programs (about 2 waves on a 132-SM H100).
TARGET_PROGRAMS = 256


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def select_config(num_tokens: int, num_seqs: int, head_dim: int) -> BlockConfig:
    """The tile configuration for a (token bucket, sequence bucket, head_dim) shape."""
    mode = "decode" if num_tokens <= num_seqs else "prefill"
    return BLOCK_TABLE.get((mode, head_dim), _DEFAULT[mode])


def _work_items(metadata: AttentionMetadata, num_tokens: int,
                block_q: int) -> tuple[jax.Array, int]:
    """Splits each sequence's query tokens into blocks of block_q tokens.

    Returns (items [4, I] int32, I) where the rows are: sequence id, first token, end token
    (exclusive), absolute position of the first token. Surplus items have first == end == 0.
    I = floor((T + N * (block_q - 1)) / block_q) bounds sum_i ceil(q_len_i / block_q).
    """
    qsl = metadata.query_start_loc.astype(jnp.int32)
    n = qsl.shape[0] - 1
    q_lens = qsl[1:] - qsl[:-1]
    blocks = (q_lens + block_q - 1) // block_q
    ends = jnp.cumsum(blocks)
    num_items = (num_tokens + n * (block_q - 1)) // block_q
    item = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, item, side="right").astype(jnp.int32), n - 1)
    valid = item < ends[-1]
    local = item - (ends[seq] - blocks[seq])
    first = qsl[seq] + local * block_q
    end = jnp.minimum(first + block_q, qsl[seq + 1])
    pos0 = metadata.seq_lens.astype(jnp.int32)[seq] - q_lens[seq] + local * block_q
    zero = jnp.zeros_like(item)
    items = jnp.stack([jnp.where(valid, seq, zero), jnp.where(valid, first, zero),
                       jnp.where(valid, end, zero), jnp.where(valid, pos0, zero)])
    return items, num_items


def _kernel(items_ref, tables_ref, q_ref, kv_ref, *refs, sm_scale: float, group_pad: int,
            page_size: int, block_rows: int, block_kv: int, num_splits: int):
    # items_ref [4, I]; tables_ref [N, W]; q_ref [Hkv, R, D]; kv_ref [2, Hkv, P*ps, D].
    # num_splits == 1: refs = (out_init, out), out [Hkv, R, D] pre-zeroed (aliased with out_init).
    # num_splits > 1:  refs = (3 inits, acc, m, l): acc [S, Hkv, R, D] f32 (unnormalized),
    #                  m, l [S, Hkv, R] f32, pre-set to (0, MASK_VALUE, 0).
    item = pl.program_id(0)
    head = pl.program_id(1)
    max_pages = tables_ref.shape[1]
    seq = items_ref[0, item]
    first = items_ref[1, item]
    end = items_ref[2, item]
    pos0 = items_ref[3, item]
    num_q = end - first
    row0 = first * group_pad

    q = q_ref[head, pl.ds(row0, block_rows), :]                             # [BR, D]
    tok = lax.broadcasted_iota(jnp.int32, (block_rows,), 0) // group_pad
    q_pos = pos0 + tok                                                      # [BR]
    kv_len = pos0 + num_q                                                   # keys [0, kv_len)
    key_iota = lax.broadcasted_iota(jnp.int32, (block_kv,), 0)

    def body(j, carry):
        m, l, acc = carry
        key_pos = j * block_kv + key_iota                                    # [BK]
        page_idx = jnp.minimum(key_pos // page_size, max_pages - 1)
        pages = tables_ref[seq, page_idx]                                   # [BK] gather
        rows = pages * page_size + key_pos % page_size
        k = kv_ref[0, head, rows, :]                                        # [BK, D]
        v = kv_ref[1, head, rows, :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * sm_scale  # [BR, BK]
        mask = key_pos[None, :] <= q_pos[:, None]
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        l = l * alpha + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        acc = acc * alpha[:, None] + pv
        return m_new, l, acc

    head_dim = q.shape[1]
    init = (jnp.full((block_rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((block_rows,), jnp.float32),
            jnp.zeros((block_rows, head_dim), jnp.float32))
    num_blocks = (kv_len + block_kv - 1) // block_kv
    row_ok = tok < num_q
    rows_slice = pl.ds(row0, block_rows)
    if num_splits == 1:
        _, l, acc = lax.fori_loop(0, num_blocks, body, init)
        out_ref = refs[1]
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]
        plgpu.store(out_ref.at[head, rows_slice, :], out.astype(out_ref.dtype),
                    mask=row_ok[:, None])
    else:
        split = pl.program_id(2)
        acc_ref, m_ref, l_ref = refs[3:]
        blocks_per_split = (num_blocks + num_splits - 1) // num_splits
        lo = split * blocks_per_split
        hi = jnp.minimum(lo + blocks_per_split, num_blocks)
        m, l, acc = lax.fori_loop(lo, hi, body, init)
        plgpu.store(acc_ref.at[split, head, rows_slice, :], acc, mask=row_ok[:, None])
        plgpu.store(m_ref.at[split, head, rows_slice], m, mask=row_ok)
        plgpu.store(l_ref.at[split, head, rows_slice], l, mask=row_ok)


def num_kv_splits(config: BlockConfig, num_items: int, num_kv_heads: int,
                  max_context: int) -> int:
    """KV splits per work item: enough programs to fill the GPU, >= 4 key blocks per split."""
    if config.kv_splits is not None:
        return config.kv_splits
    programs = num_items * num_kv_heads
    splits = 1
    while (splits < 32 and programs * splits * 2 <= TARGET_PROGRAMS
           and max_context >= 2 * splits * 4 * config.block_kv):
        splits *= 2
    return splits


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "config"))
def paged_attention(q: jax.Array, kv_pages: jax.Array, metadata: AttentionMetadata, *,
                    sm_scale: float, interpret: bool = False,
                    config: BlockConfig | None = None) -> jax.Array:
    """Ragged paged attention; same contract as reference.paged_attention_reference.

    q: [T, Hq, D]; kv_pages: [2, Hkv, P, page_size, D]; metadata: AttentionMetadata (T tokens,
    N sequences, W pages each). Returns [T, Hq, D] in q.dtype, zeros for padding tokens.
    interpret=True runs the kernel in the Pallas interpreter (CPU). config overrides BLOCK_TABLE.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, num_pages, page_size, _ = kv_pages.shape
    num_seqs, max_pages = metadata.block_tables.shape
    group = num_q_heads // num_kv_heads
    group_pad = _next_pow2(group)
    if config is None:
        config = select_config(num_tokens, num_seqs, head_dim)
    block_rows = max(config.block_rows, group_pad, 16)
    block_q = block_rows // group_pad
    block_kv = max(config.block_kv, 16)

    items, num_items = _work_items(metadata, num_tokens, block_q)
    splits = num_kv_splits(config, num_items, num_kv_heads, max_pages * page_size)
    # Query rows (token, head-in-group), grouped by kv head; padded so every row block is in range.
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    qg = qg.transpose(1, 0, 2, 3).reshape(num_kv_heads, num_tokens * group_pad, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, block_rows), (0, 0)))
    num_rows = qg.shape[1]
    kv_flat = kv_pages.reshape(2, num_kv_heads, num_pages * page_size, head_dim)

    kernel = functools.partial(_kernel, sm_scale=sm_scale, group_pad=group_pad,
                               page_size=page_size, block_rows=block_rows, block_kv=block_kv,
                               num_splits=splits)
    params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    args = (items, metadata.block_tables.astype(jnp.int32), qg, kv_flat)
    if splits == 1:
        out = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
            grid=(num_items, num_kv_heads),
            input_output_aliases={4: 0},
            interpret=interpret,
            compiler_params=params,
            name="ragged_paged_attention",
        )(*args, jnp.zeros_like(qg))
    else:
        part_shape = (splits, num_kv_heads, num_rows)
        acc, m, l = pl.pallas_call(
            kernel,
            out_shape=(jax.ShapeDtypeStruct(part_shape + (head_dim,), jnp.float32),
                       jax.ShapeDtypeStruct(part_shape, jnp.float32),
                       jax.ShapeDtypeStruct(part_shape, jnp.float32)),
            grid=(num_items, num_kv_heads, splits),
            input_output_aliases={4: 0, 5: 1, 6: 2},
            interpret=interpret,
            compiler_params=params,
            name="ragged_paged_attention_split_kv",
        )(*args, jnp.zeros(part_shape + (head_dim,), jnp.float32),
          jnp.full(part_shape, MASK_VALUE, jnp.float32), jnp.zeros(part_shape, jnp.float32))
        m_all = jnp.max(m, axis=0)
        w = jnp.exp(m - m_all[None])                                        # [S, Hkv, R]
        denom = jnp.sum(w * l, axis=0)
        out = jnp.sum(w[..., None] * acc, axis=0) / jnp.where(denom > 0, denom, 1.0)[..., None]
        out = out.astype(q.dtype)
    out = out[:, :num_tokens * group_pad].reshape(num_kv_heads, num_tokens, group_pad, head_dim)
    out = out[:, :, :group].transpose(1, 0, 2, 3)
    return out.reshape(num_tokens, num_q_heads, head_dim)
