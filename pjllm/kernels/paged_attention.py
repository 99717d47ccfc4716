"""Ragged paged attention as Pallas kernels (Triton lowering on GPU, interpret mode on CPU).

One entry point, `paged_attention`, serves a flattened batch that mixes prefill chunks (many
query tokens per sequence, possibly starting at a cached offset) and decodes (one query token per
sequence). Its kernel runs one program per (work item, kv head, kv split), where a work item is
a block of consecutive query tokens of one sequence (or of padding tokens); the work list is
built in XLA from the metadata (a few tiny ops, shared by all layers of a step). The shape of
the batch picks one of two modes (tiles and grid):

- **decode** (token bucket <= sequence bucket, or <= DECODE_MAX_TOKENS tokens): small blocks
  (`block_rows // G_pad` tokens: one decode each) and KV splits for long contexts, optionally a
  persistent grid. Each item holds a token, so there are at most T items: one program per
  decode, and a prefill chunk in a decode bucket spreads over as many programs as it has
  blocks (a lone prompt padded to N = T runs on T / block_q programs per kv head, not one).
- **ragged** (everything else): blocks of `block_q` tokens sized for prefill chunks.

Each program loads the query rows of one kv head's GQA group -- rows are (token,
head-in-group) pairs -- straight from q [T, Hq, D] (a row gather, no transposes in XLA), walks
the sequence's keys `block_kv` at a time with an online softmax, so each K/V tile is loaded once
for the whole GQA group, and scatters its rows straight into the [T, Hq, D] output. Query
tokens past query_start_loc[N] (padding) are written as zeros by the kernel itself, so no XLA
op runs before or after the pallas_call when kv_splits == 1. With kv_splits > 1
(flash-decoding) each split writes an unnormalised partial (acc, max, sum) and one small XLA
fusion combines them.

Layout (see reference.py): kv_pages [2, Hkv, P, page_size, D]. The kernels view it as
[2, Hkv, P * page_size, D] (a free reshape) and gather key rows `page * page_size + offset`
through the block table, so block_kv does not have to match page_size.

Head dims: Triton tensors must have power-of-two sizes, so the kernels compute on
D_pad = next_pow2(D) columns (80, 96, 112 -> 128). Loads mask the columns >= D (read as zeros,
which add nothing to q.k or p.v) and stores skip them; q, the pages, the output and the split-KV
partials keep the real D, so no KV memory is spent on padding. For a power-of-two D the kernels
have no column mask at all.

Float32 inputs run their dots at Precision.HIGHEST: the Triton lowering would otherwise use TF32.

Tile sizes come from a table beside this file (paged_attention_tuning.json, written by the
tuner `benchmarks/tune_kernels.py`), keyed by shape; see `tile_configs.select_config`. `launch_config`
and `num_work_items` say what a call launches, for tools that report or tune it.
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
from pjllm.kernels.reference import LOG2E, MASK_VALUE, combine_partials
from pjllm.kernels.tile_configs import (DECODE_MAX_TOKENS, DEFAULT_CONFIGS, TARGET_PROGRAMS,
                                         TUNING_FILE, BlockConfig, kernel_mode, load_tuning_table,
                                         select_config, shape_key)

# The kernels, and the tile selection they launch with (tile_configs.py), which the tuner,
# the kernel benchmark and the tests reach through this module.
__all__ = ["paged_attention", "prefix_attention_partials", "launch_config", "num_kv_splits",
           "num_work_items", "BlockConfig", "DECODE_MAX_TOKENS", "DEFAULT_CONFIGS",
           "TARGET_PROGRAMS", "TUNING_FILE", "kernel_mode", "load_tuning_table", "select_config",
           "shape_key"]

def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def num_work_items(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """The work items (the kernel grid's first axis) for T tokens of N sequences cut into blocks
    of block_q query tokens: min(floor((T + N * (block_q - 1)) / block_q) + 1, T).

    That leaves items for the padding tokens too: the real items number sum_i ceil(q_i / block_q)
    <= (Q + N * (block_q - 1)) / block_q for Q = query_start_loc[N], so the rest number more than
    (T - Q) / block_q, hence at least ceil((T - Q) / block_q). And each real item holds at least
    one token, and each padding item but the last holds block_q of them, so T items always
    suffice: the tighter bound for small blocks in a bucket of many sequences (a decode
    bucket)."""
    return min((num_tokens + num_seqs * (block_q - 1)) // block_q + 1, num_tokens)


def _work_items(metadata: AttentionMetadata, num_tokens: int, block_q: int) -> jax.Array:
    """Splits each sequence's query tokens into blocks of block_q tokens, for the kernel.

    Returns items [5, I] int32 (I = num_work_items(T, N, block_q)) whose rows are: sequence id, first token, end
    token (exclusive), absolute position of the first token, and the number of keys the block
    reads (its last token's position + 1). Items past the real ones cover the padding tokens
    [query_start_loc[N], T) block_q at a time with 0 keys, so the kernel writes their zeros.
    """
    qsl = metadata.query_start_loc.astype(jnp.int32)
    n = qsl.shape[0] - 1
    q_lens = qsl[1:] - qsl[:-1]
    blocks = (q_lens + block_q - 1) // block_q
    ends = jnp.cumsum(blocks)
    num_items = num_work_items(num_tokens, n, block_q)
    item = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, item, side="right", method="compare_all")
                      .astype(jnp.int32), n - 1)          # one fusion, no loop
    valid = item < ends[-1]
    local = item - (ends[seq] - blocks[seq])
    first = qsl[seq] + local * block_q
    end = jnp.minimum(first + block_q, qsl[seq + 1])
    pos0 = metadata.seq_lens.astype(jnp.int32)[seq] - q_lens[seq] + local * block_q
    # Padding items: tokens [qsl[N] + k * block_q, ...) clipped to T, no keys.
    pad_first = jnp.minimum(qsl[n] + (item - ends[-1]) * block_q, num_tokens)
    pad_end = jnp.minimum(pad_first + block_q, num_tokens)
    zero = jnp.zeros_like(item)
    items = jnp.stack([jnp.where(valid, seq, zero),
                       jnp.where(valid, first, pad_first),
                       jnp.where(valid, end, pad_end),
                       jnp.where(valid, pos0, zero),
                       jnp.where(valid, pos0 + (end - first), zero)])
    return items


def _head_cols(head_dim: int):
    """Column ids [1, D_pad] of the head dim padded to a power of 2 (Triton tensors have
    power-of-two sizes), and which of them are real columns: None when head_dim already is a
    power of 2, so that those kernels carry no mask at all."""
    cols = lax.broadcasted_iota(jnp.int32, (1, _next_pow2(head_dim)), 1)
    return cols, (cols < head_dim if cols.shape[1] != head_dim else None)


def _load_rows(ref, index, rows):
    """ref[*index, rows, :] as [len(rows), D_pad], the padding columns as zeros (masked: never
    read from memory, where they would be the next row's first columns)."""
    head_dim = ref.shape[-1]
    if head_dim == _next_pow2(head_dim):
        return ref[(*index, rows, slice(None))]
    cols, col_ok = _head_cols(head_dim)
    return plgpu.load(ref.at[(*index, rows[:, None], cols)], mask=col_ok, other=0.0)


def _attend(q, q_pos, kv_ref, tables_ref, seq, head, lo, hi, n_full, *, sm_scale: float,
            page_size: int, block_kv: int, window: int | None = None, last_pos=None,
            row_slopes=None):
    """Online softmax of q [BR, D_pad] over key blocks [lo, hi) of sequence `seq`, kv head `head`.

    Keys past q_pos are masked, and with a sliding `window` keys at or before q_pos - window.
    Blocks before `n_full` (and, with a window, from the first one inside the window of the
    block's last row, at `last_pos`) are known to be visible to every row, so they run in a loop
    without the mask; the rest (the causal diagonal, the end of the context, the window's start)
    in masked loops. Scores are kept in base 2 (log2(e) folded into the scale, exp2 is a single
    instruction where exp is a libdevice call).

    K and V tiles are loaded like q (_load_rows: padding columns are zeros). With `row_slopes`
    [BR] (ALiBi) each score gets slope * (key position - query position).
    Returns (m [BR], l [BR], acc [BR, D_pad]) in float32, m in log2 units, acc unnormalised.
    """
    max_pages = tables_ref.shape[1]
    key_iota = lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
    scale = sm_scale * LOG2E
    # The Triton lowering runs float32 dots as TF32 unless asked for HIGHEST (IEEE fp32);
    # 16-bit inputs keep the default.
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(j, carry, masked: bool):
        m, l, acc = carry
        key_pos = j * block_kv + key_iota                                    # [BK]
        page_idx = jnp.minimum(key_pos // page_size, max_pages - 1)
        pages = tables_ref[seq, page_idx]                                   # [BK] gather
        rows = pages * page_size + key_pos % page_size
        k = _load_rows(kv_ref, (0, head), rows)                             # [BK, D_pad]
        v = _load_rows(kv_ref, (1, head), rows)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale     # [BR, BK]
        if row_slopes is not None:
            distance = (key_pos[None, :] - q_pos[:, None]).astype(jnp.float32)
            s = s + (row_slopes * LOG2E)[:, None] * distance
        if masked:
            mask = key_pos[None, :] <= q_pos[:, None]
            if window is not None:
                mask = mask & (key_pos[None, :] > q_pos[:, None] - window)
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if masked:          # a row with no visible key yet has m_new == MASK_VALUE
            p = jnp.where(mask, p, 0.0)
        l = l * alpha + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        acc = acc * alpha[:, None] + pv
        return m_new, l, acc

    block_rows, head_dim = q.shape
    carry = (jnp.full((block_rows,), MASK_VALUE, jnp.float32),
             jnp.zeros((block_rows,), jnp.float32),
             jnp.zeros((block_rows, head_dim), jnp.float32))
    unmasked_from = lo
    if window is not None:  # blocks holding keys that some row's window has left behind
        unmasked_from = jnp.minimum(jnp.maximum((last_pos - window + block_kv) // block_kv, lo), hi)
        carry = lax.fori_loop(lo, unmasked_from, functools.partial(body, masked=True), carry)
    mid = jnp.minimum(jnp.maximum(n_full, unmasked_from), hi)
    carry = lax.fori_loop(unmasked_from, mid, functools.partial(body, masked=False), carry)
    return lax.fori_loop(mid, hi, functools.partial(body, masked=True), carry)


def _key_blocks(first_pos, last_pos, split, *, block_kv: int, num_splits: int,
                window: int | None = None):
    """Key blocks [lo, hi) that split `split` of `num_splits` reads for query rows at positions
    first_pos..last_pos: every key up to last_pos, from the first one inside first_pos's window
    (with a sliding window, the pages before it are never read)."""
    first_block = 0 if window is None else jnp.maximum(first_pos - window + 1, 0) // block_kv
    num_blocks = (last_pos + block_kv) // block_kv
    if num_splits == 1:
        return first_block, num_blocks
    per_split = (num_blocks - first_block + num_splits - 1) // num_splits
    lo = first_block + split * per_split
    return lo, jnp.minimum(lo + per_split, num_blocks)


def _store(out_refs, rows, row_ok, m, l, acc, split):
    """Writes a block's rows: normalised output (out_refs = (out,)) or the split's partials
    (out_refs = (acc, m, l)).

    acc is [BR, D_pad]; only the real head_dim columns are written (outputs and partials have
    the real head_dim, so the split combine needs no slicing)."""
    # Row scatter with both indices as arrays (the interpreter has no mixed array/slice store).
    # Masked rows point one past the end: never touched on GPU, dropped by the interpreter (an
    # in-range dummy row would be written back with stale data by the interpreter's scatter);
    # padding columns are past the end of their row too, dropped the same way.
    cols, col_ok = _head_cols(out_refs[0].shape[-1])
    num_rows = out_refs[0].shape[-2]
    rows = jnp.where(row_ok, rows, num_rows)

    # Built at each store, after its value: a power-of-two head_dim then lowers to op-for-op the
    # IR of a kernel without column masks.
    def mask():
        return row_ok[:, None] if col_ok is None else row_ok[:, None] & col_ok

    if len(out_refs) == 1:
        (out_ref,) = out_refs
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]
        plgpu.store(out_ref.at[rows[:, None], cols], out.astype(out_ref.dtype), mask=mask())
    else:
        acc_ref, m_ref, l_ref = out_refs
        plgpu.store(acc_ref.at[split, rows[:, None], cols], acc, mask=mask())
        plgpu.store(m_ref.at[split, rows], m, mask=row_ok)
        plgpu.store(l_ref.at[split, rows], l, mask=row_ok)


def _row_slopes(slopes_ref, q_head):
    """Each row's ALiBi slope [BR] (rows of padding heads read the last head's), or None."""
    if slopes_ref is None:
        return None
    return slopes_ref[jnp.minimum(q_head, slopes_ref.shape[0] - 1)]


def _row_layout(head, *, num_q_heads: int, group: int, group_pad: int, block_rows: int):
    """Per row of a block: token offset in the block, q head, and whether the head is real."""
    r = lax.broadcasted_iota(jnp.int32, (block_rows,), 0)
    tok_off = r // group_pad
    g = r % group_pad
    return tok_off, head * group + g, g < group


def _item_unit(item, head, split, *, items_ref, tables_ref, slopes_ref, q_ref, kv_ref, out_refs,
               sm_scale: float, num_q_heads: int, group: int, group_pad: int, page_size: int,
               block_rows: int, block_kv: int, num_splits: int, window: int | None):
    """Work item `item` (one block of query tokens of one sequence, or of padding tokens),
    kv head `head`, KV split `split`."""
    seq, first, end, pos0, n_keys = (items_ref[row, item] for row in range(5))

    # Items past the last token touch no memory: a bucket of N sequences lists about N of them
    # whatever the step holds.
    @pl.when(end > first)
    def _():
        tok_off, q_head, head_ok = _row_layout(head, num_q_heads=num_q_heads, group=group,
                                               group_pad=group_pad, block_rows=block_rows)
        tok = first + tok_off
        row_ok = (tok < end) & head_ok
        rows = jnp.where(row_ok, tok * num_q_heads + q_head, 0)
        q = _load_rows(q_ref, (), rows)                                     # [BR, D_pad]
        lo, hi = _key_blocks(pos0, n_keys - 1, split, block_kv=block_kv, num_splits=num_splits,
                             window=window)
        m, l, acc = _attend(q, pos0 + tok_off, kv_ref, tables_ref, seq, head, lo, hi,
                            (pos0 + 1) // block_kv, sm_scale=sm_scale, page_size=page_size,
                            block_kv=block_kv, window=window, last_pos=n_keys - 1,
                            row_slopes=_row_slopes(slopes_ref, q_head))
        _store(out_refs, rows, row_ok, m, l, acc, split)


def _kernel(items_ref, tables_ref, slopes_ref, q_ref, kv_ref, *out_refs, num_splits: int,
            persistent: bool, alibi: bool, **statics):
    # items_ref [5, I]; tables_ref [N, W]; q_ref [T*Hq, D]; kv_ref [2, Hkv, P*ps, D].
    # out_refs: (out [T*Hq, D],) or (acc [S, T*Hq, D], m [S, T*Hq], l [S, T*Hq]).
    # A unit of work is (item, kv head, split). Grid (I, Hkv, S): one unit per program.
    # persistent: grid (programs,), program p does units p, p + programs, ... (split fastest).
    unit = functools.partial(_item_unit, items_ref=items_ref, tables_ref=tables_ref,
                             slopes_ref=slopes_ref if alibi else None, q_ref=q_ref, kv_ref=kv_ref,
                             out_refs=out_refs, num_splits=num_splits, **statics)
    if not persistent:
        unit(pl.program_id(0), pl.program_id(1), pl.program_id(2) if num_splits > 1 else 0)
        return
    num_kv_heads = kv_ref.shape[1]
    num_units = items_ref.shape[1] * num_kv_heads * num_splits
    pid = pl.program_id(0)
    programs = pl.num_programs(0)

    def strided_unit(i, carry):
        u = pid + i * programs
        rest = u // num_splits
        unit(rest // num_kv_heads, rest % num_kv_heads, u % num_splits)
        return carry

    lax.fori_loop(0, (num_units - pid + programs - 1) // programs, strided_unit, 0)


def _num_sms() -> int:
    """Multiprocessors of the default device (4 off GPU, where the kernels are interpreted)."""
    device = jax.devices()[0]
    return int(getattr(device, "core_count", 0) or 4) if device.platform == "gpu" else 4


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


def launch_config(num_tokens: int, num_seqs: int, *, num_q_heads: int, num_kv_heads: int,
                  head_dim: int, page_size: int, max_context: int, dtype=None,
                  config: BlockConfig | None = None) -> BlockConfig:
    """The tiles `paged_attention` runs a shape with -- `config`, or else the tuning table's
    choice -- as it launches them: block_rows at least the padded GQA group and 16, block_kv at
    least 16, and the KV split count resolved when the config leaves it to the grid size."""
    if config is None:
        config = select_config(num_tokens, num_seqs, head_dim, num_q_heads=num_q_heads,
                               num_kv_heads=num_kv_heads, page_size=page_size,
                               max_context=max_context, dtype=dtype)
    group_pad = _next_pow2(num_q_heads // num_kv_heads)
    config = dataclasses.replace(config, block_rows=max(config.block_rows, group_pad, 16),
                                 block_kv=max(config.block_kv, 16))
    if config.kv_splits is not None:
        return config
    if kernel_mode(num_tokens, num_seqs) == "decode":
        # As the tuning table was made: one program per sequence. (The items number at most
        # max(N, T); beyond N only when T <= DECODE_MAX_TOKENS, and those extra items hold padding.)
        programs = num_seqs
    else:  # one work item per block_rows rows of (token, head-in-group)
        programs = num_work_items(num_tokens, num_seqs, config.block_rows // group_pad)
    return dataclasses.replace(
        config, kv_splits=num_kv_splits(config, programs, num_kv_heads, max_context))


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "config", "partials",
                                             "sliding_window"))
def paged_attention(q: jax.Array, kv_pages: jax.Array, metadata: AttentionMetadata, *,
                    sm_scale: float, interpret: bool = False, config: BlockConfig | None = None,
                    partials: bool = False, sliding_window: int | None = None,
                    alibi_slopes: jax.Array | None = None):
    """Ragged paged attention; same contract as reference.paged_attention_reference.

    q: [T, Hq, D]; kv_pages: [2, Hkv, P, page_size, D]; metadata: AttentionMetadata (T tokens,
    N sequences, W pages each). Returns [T, Hq, D] in q.dtype, zeros for padding tokens.
    interpret=True runs the kernel in the Pallas interpreter (CPU). config overrides the table.
    partials=True returns the unnormalised softmax state instead, as
    reference.paged_attention_partials_reference does (acc [S, T * Hq, D], m and l [S, T * Hq],
    S the KV split count), for reference.combine_partials. sliding_window: each token attends to
    itself and the sliding_window - 1 keys before it only; the pages before that are not read.
    alibi_slopes: f32[Hq], ALiBi: each score gets slope * (key position - query position).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, num_pages, page_size, _ = kv_pages.shape
    num_seqs, max_pages = metadata.block_tables.shape
    group = num_q_heads // num_kv_heads
    group_pad = _next_pow2(group)
    mode = kernel_mode(num_tokens, num_seqs)
    max_context = max_pages * page_size  # keys a query token may read
    if sliding_window is not None:
        max_context = min(max_context, sliding_window)
    config = launch_config(num_tokens, num_seqs, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                           head_dim=head_dim, page_size=page_size, max_context=max_context,
                           dtype=q.dtype, config=config)
    splits, block_rows, block_kv = config.kv_splits, config.block_rows, config.block_kv
    tables = metadata.block_tables.astype(jnp.int32)
    common = dict(sm_scale=sm_scale, num_q_heads=num_q_heads, group=group, group_pad=group_pad,
                  page_size=page_size, block_rows=block_rows, block_kv=block_kv,
                  window=sliding_window, alibi=alibi_slopes is not None)
    slopes = (jnp.zeros((num_q_heads,), jnp.float32) if alibi_slopes is None
              else alibi_slopes.astype(jnp.float32))
    block_q = block_rows // group_pad
    items = _work_items(metadata, num_tokens, block_q)
    num_items = items.shape[1]
    units = num_items * num_kv_heads * splits
    persistent = (mode == "decode" and config.programs_per_sm > 0
                  and units > config.programs_per_sm * _num_sms())
    kernel = functools.partial(_kernel, num_splits=splits, persistent=persistent, **common)
    grid = ((config.programs_per_sm * _num_sms(),) if persistent
            else (num_items, num_kv_heads) + ((splits,) if splits > 1 else ()))
    name = "paged_decode_attention" if mode == "decode" else "ragged_paged_attention"
    args = (items, tables, slopes)
    return _launch(kernel, args, q, kv_pages, grid=grid, config=config, name=name,
                   interpret=interpret, partials=partials)


def _launch(kernel, args: tuple, q: jax.Array, kv_pages: jax.Array, *, grid: tuple,
            config: BlockConfig, name: str, interpret: bool, partials: bool):
    """Runs `kernel(*args, q_rows, kv_flat, *outputs)`: normalised rows [T, Hq, D] when it has
    one KV split and no partials are asked for, else the partials (acc, m, l), combined here
    unless `partials`."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, num_pages, page_size, _ = kv_pages.shape
    q_rows = q.reshape(num_tokens * num_q_heads, head_dim)                  # free reshapes
    kv_flat = kv_pages.reshape(2, num_kv_heads, num_pages * page_size, head_dim)
    params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    num_rows = num_tokens * num_q_heads
    splits = config.kv_splits
    if splits == 1 and not partials:
        out = pl.pallas_call(
            kernel, out_shape=jax.ShapeDtypeStruct((num_rows, head_dim), q.dtype), grid=grid,
            interpret=interpret, compiler_params=params, name=name,
        )(*args, q_rows, kv_flat)
        return out.reshape(num_tokens, num_q_heads, head_dim)
    part = (splits, num_rows)
    state = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(part + (head_dim,), jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32)),
        grid=grid, interpret=interpret, compiler_params=params,
        name=name + ("_split_kv" if splits > 1 else "_partials"),
    )(*args, q_rows, kv_flat)
    if partials:
        return state
    return combine_partials(*state, q.dtype).reshape(num_tokens, num_q_heads, head_dim)


def _prefix_kernel(prefix_ref, tables_ref, q_ref, kv_ref, *out_refs, sm_scale: float,
                   num_q_heads: int, group: int, group_pad: int, page_size: int,
                   block_rows: int, block_kv: int, num_splits: int):
    # prefix_ref [2]: (prefix length, query tokens); tables_ref [1, W]: the prefix's pages.
    # Grid (token blocks, Hkv, splits): block_q consecutive tokens, whatever their sequences.
    prefix_len, num_query_tokens = prefix_ref[0], prefix_ref[1]
    head = pl.program_id(1)
    num_tokens = q_ref.shape[0] // num_q_heads
    tok_off, q_head, head_ok = _row_layout(head, num_q_heads=num_q_heads, group=group,
                                           group_pad=group_pad, block_rows=block_rows)
    tok = pl.program_id(0) * (block_rows // group_pad) + tok_off
    row_ok = (tok < num_tokens) & head_ok
    rows = jnp.where(row_ok, tok * num_q_heads + q_head, 0)
    q = _load_rows(q_ref, (), rows)                                         # [BR, D_pad]
    split = pl.program_id(2) if num_splits > 1 else 0
    lo, hi = _key_blocks(0, prefix_len - 1, split, block_kv=block_kv, num_splits=num_splits)
    # Every row sees every prefix key: only a last block running past the prefix is masked.
    last_key = jnp.full((block_rows,), prefix_len - 1, jnp.int32)
    m, l, acc = _attend(q, last_key, kv_ref, tables_ref, 0, head, lo, hi, prefix_len // block_kv,
                        sm_scale=sm_scale, page_size=page_size, block_kv=block_kv)
    real = tok < num_query_tokens  # padding tokens see no key
    m = jnp.where(real, m, MASK_VALUE)
    l = jnp.where(real, l, 0.0)
    acc = jnp.where(real[:, None], acc, 0.0)
    _store(out_refs, rows, row_ok, m, l, acc, split)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "config"))
def prefix_attention_partials(q: jax.Array, kv_pages: jax.Array, prefix_pages: jax.Array,
                              prefix_len: jax.Array, num_query_tokens: jax.Array, *,
                              sm_scale: float, interpret: bool = False,
                              config: BlockConfig | None = None
                              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The common-prefix half of cascade attention; same contract as
    reference.prefix_attention_partials_reference.

    One program per (block of block_q query tokens, kv head, KV split) reads the prefix's keys
    once for all its tokens, whichever sequences they belong to: the prefix is read
    T / block_q times per kv head, not once per sequence.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = kv_pages.shape
    group = num_q_heads // num_kv_heads
    group_pad = _next_pow2(group)
    config = config or DEFAULT_CONFIGS["prefill"]
    block_rows = max(config.block_rows, group_pad, 16)
    block_kv = max(config.block_kv, 16)
    num_blocks = -(-num_tokens // (block_rows // group_pad))
    splits = num_kv_splits(dataclasses.replace(config, block_kv=block_kv), num_blocks,
                           num_kv_heads, prefix_pages.shape[0] * page_size)
    config = dataclasses.replace(config, block_rows=block_rows, block_kv=block_kv,
                                 kv_splits=splits)
    kernel = functools.partial(_prefix_kernel, sm_scale=sm_scale, num_q_heads=num_q_heads,
                               group=group, group_pad=group_pad, page_size=page_size,
                               block_rows=block_rows, block_kv=block_kv, num_splits=splits)
    args = (jnp.stack([prefix_len, num_query_tokens]).astype(jnp.int32),
            prefix_pages.astype(jnp.int32)[None])
    grid = (num_blocks, num_kv_heads) + ((splits,) if splits > 1 else ())
    return _launch(kernel, args, q, kv_pages, grid=grid, config=config,
                   name="common_prefix_attention", interpret=interpret, partials=True)
