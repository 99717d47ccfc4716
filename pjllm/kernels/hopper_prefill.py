"""Ragged paged prefill attention for Hopper, in Pallas's Mosaic GPU backend (TMA and wgmma).

The Triton kernels (paged_attention.py) gather K/V rows through the block table with pointer
arithmetic and run their dots on mma.sync; on an H200 their prefill reaches about half of cuDNN's
dense flash attention. This kernel feeds the tensor cores the Hopper way: whole pages go from
HBM into swizzled shared memory by TMA, two stages ahead, and QK^T and PV run as wgmma.

Work items follow the token axis in aligned tiles of BLOCK_Q tokens, cut at sequence boundaries
(as jax's ragged dot cuts its groups): item (sequence, tile) computes the tile's rows of that
sequence. So a tile's queries are one TMA box q[t0:t0 + BLOCK_Q, head, :] at any batch layout,
rows of neighbouring sequences ride along unstored, and the stores are a ladder of TMA boxes of
64, 32, ..., 1 rows that touch only the item's rows. One warpgroup per program; program (slot,
query head) computes items slot, slot + slots, ... for its head, up to the count of items with
rows (on the device), so the row-less rest of the list (about N of them) costs no launches; GQA
reuse of K/V tiles comes from L2. A one-token item (a decode in a mixed step) is computed by
its kv head's first query head's program with the group's heads as rows, so its K/V are read
once per group (the group's other programs skip it).

On an H200 (docs/perf.md, device time) it runs prefill chunks of 512-2,048 tokens at offset 0
at 0.84x-1.0x cuDNN's speed (dense, contiguous KV) whatever the bucket's N, in 0.3x-0.65x the
Triton kernel's time, and a mixed step of 255 decodes and a 288-token chunk in 0.83x.

Scope (`supports` says it): 16-bit q and pages, head_dim a multiple of 64, page_size dividing
BLOCK_KV and a multiple of 8, T a multiple of BLOCK_Q, no sliding window, no ALiBi, one KV split.
Everything else stays on the Triton kernels, which cover all of those. Tested against
reference.py on CPU through Mosaic GPU's interpret mode.

Layouts as in reference.py: q [T, Hq, D], kv_pages [2, Hkv, P, page_size, D].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pjllm.kernels.attention_metadata import AttentionMetadata
from pjllm.kernels.reference import LOG2E, MASK_VALUE

BLOCK_Q = 64    # query rows per program: one wgmma M tile of one warpgroup
BLOCK_KV = 64   # keys per inner step
NUM_STAGES = 2  # K/V blocks in flight
# Programs per query head stride over the work list's items with rows, whose count only the
# device knows: as many as a bucket's whole tiles (one prefill item each), and at least enough
# for the packed decodes of a mixed step (one active head per kv head) to fill an H200 twice
# over, 64 x 8 kv heads. Not one per listed item: a bucket of N sequences lists about N
# row-less items, and a program that only reads its item and exits still takes a launch slot.
MIN_ITEM_SLOTS = 64


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x), where wgmma exists."""
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    return device.platform == "gpu" and capability.startswith("9")


def supports(q: jax.Array, kv_pages: jax.Array, *, sliding_window: int | None,
             alibi: bool) -> bool:
    """Whether this kernel runs the batch (else the Triton kernel does)."""
    num_tokens, _, head_dim = q.shape
    page_size = kv_pages.shape[3]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and kv_pages.dtype == q.dtype
            and head_dim % 64 == 0 and head_dim <= 256 and num_tokens % BLOCK_Q == 0
            and BLOCK_KV % page_size == 0 and page_size % 8 == 0
            and sliding_window is None and not alibi)


def work_items(metadata: AttentionMetadata, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """The kernel's work list: ([6, I] int32 with I = T / BLOCK_Q + N + 1, and i32[1], how many
    of its items have rows).

    Rows: sequence id, tile (its first token over BLOCK_Q), first and end row of
    the item within the tile, the position of the first row's token, and the number of keys
    the item reads (its last token's position + 1). The tokens after query_start_loc[N] form
    one more group that reads no keys, so the kernel writes their zeros; items past the real
    ones have no rows.

    The items with rows come in reverse token order, so that a sequence's last tiles, which
    read the most keys, start first and the grid does not end on them (on an H200 this took
    2048 tokens at offset 0 from 0.1084 to 0.095 ms); the row-less ones come last.
    """
    qsl = metadata.query_start_loc.astype(jnp.int32)
    n = qsl.shape[0] - 1
    starts = jnp.concatenate([qsl, jnp.array([num_tokens], jnp.int32)])  # padding group last
    group_len = starts[1:] - starts[:-1]                                  # [N + 1]
    first_tile = starts[:-1] // BLOCK_Q
    num_tiles = jnp.where(group_len > 0, (starts[1:] - 1) // BLOCK_Q - first_tile + 1, 0)
    ends = jnp.cumsum(num_tiles)
    num_items = num_tokens // BLOCK_Q + n + 1
    index = jnp.arange(num_items, dtype=jnp.int32)
    valid = index < ends[-1]
    item = jnp.where(valid, ends[-1] - 1 - index, index)  # the item listed at `index`
    group = jnp.minimum(jnp.searchsorted(ends, item, side="right", method="compare_all")
                        .astype(jnp.int32), n)
    tile = first_tile[group] + item - (ends[group] - num_tiles[group])
    t0 = tile * BLOCK_Q
    first = jnp.maximum(starts[group], t0)
    end = jnp.minimum(starts[group + 1], t0 + BLOCK_Q)
    is_seq = group < n
    seq = jnp.minimum(group, n - 1)
    q_len = qsl[seq + 1] - qsl[seq]
    pos = metadata.seq_lens.astype(jnp.int32)[seq] - q_len + first - qsl[seq]
    zero = jnp.zeros_like(item)
    keys = jnp.where(valid & is_seq, pos + end - first, zero)
    items = jnp.stack([jnp.where(valid, seq, zero), jnp.where(valid, tile, zero),
                       jnp.where(valid, first - t0, zero), jnp.where(valid, end - t0, zero),
                       jnp.where(valid & is_seq, pos, zero), keys])
    return items, ends[-1:]


def _packed_heads(num_q_heads: int, group: int) -> int:
    """Rows of the Q box of a one-token item (a decode), which computes a kv head's whole query
    group in one program (its K/V read once, not once per query head): a whole number of
    8-row shared-memory tiles holding whole groups, so its start is provably tile-aligned.
    0 where that cannot be (groups of 1, or sizes that straddle tiles): one head per program."""
    rows = max(8, group)
    whole_groups = rows % group == 0 and (group <= 8 or group % 8 == 0)
    if group == 1 or not whole_groups or num_q_heads % rows or rows > BLOCK_Q:
        return 0
    return rows


def _kernel(count_ref, items_ref, tables_ref, q_ref, kv_ref, out_ref, **statics):
    # count_ref [1]: the items with rows, which come first in items_ref [6, I]. Program (slot,
    # head) computes items slot, slot + slots, ... of them for query head `head`.
    slot = lax.axis_index("slot")
    slots = lax.axis_size("slot")
    head = lax.axis_index("head")

    def item_step(i, carry):
        _item(slot + i * slots, head, items_ref, tables_ref, q_ref, kv_ref, out_ref, **statics)
        return carry

    lax.fori_loop(0, (count_ref[0] - slot + slots - 1) // slots, item_step, None)


def _item(item, head, items_ref, tables_ref, q_ref, kv_ref, out_ref, *, sm_scale: float,
          group: int, page_size: int, num_stages: int, registers_p: bool):
    # items_ref [6, I]; tables_ref [N, W]; q_ref, out_ref [T, Hq, D]; kv_ref [2, Hkv, P, ps, D]
    # (all in HBM). Item `item` for query head `head`; rows are the item's tokens. A one-token
    # item is computed by the group's first head's program, rows being its heads.
    kv_head = head // group
    num_q_heads, head_dim = q_ref.shape[1:]
    dtype = q_ref.dtype
    # t0 a visible multiple of BLOCK_Q: Mosaic GPU proves the Q box's start a whole number of
    # its shared-memory tiles.
    seq, t0 = items_ref[0, item], items_ref[1, item] * BLOCK_Q
    row_lo, row_hi = items_ref[2, item], items_ref[3, item]
    pos_lo, num_keys = items_ref[4, item], items_ref[5, item]
    packed_rows = _packed_heads(num_q_heads, group)
    packed = (row_hi - row_lo == 1) if packed_rows else False
    active = jnp.logical_or(jnp.logical_not(packed), head % group == 0)  # packed: first head only
    max_pages = tables_ref.shape[1]
    pages_per_block = BLOCK_KV // page_size
    num_blocks = jnp.where(active, (num_keys + BLOCK_KV - 1) // BLOCK_KV, 0)
    num_full = (pos_lo + 1) // BLOCK_KV  # blocks every row of the item sees whole
    if packed_rows:
        packed_head0 = (kv_head * group // packed_rows) * packed_rows  # the Q box's first head
        packed_row0 = kv_head * group - packed_head0                   # the group's first row

    def attend(q_smem, k_smem, v_smem, *scratch):
        q_barrier, k_barriers, v_barriers = scratch[-3:]

        def fetch(block, slot):
            for p in range(pages_per_block):
                page = tables_ref[seq, jnp.minimum(block * pages_per_block + p, max_pages - 1)]
                rows = pl.ds(p * page_size, page_size)
                plgpu.copy_gmem_to_smem(kv_ref.at[0, kv_head, page], k_smem.at[slot, rows],
                                        k_barriers.at[slot])
                plgpu.copy_gmem_to_smem(kv_ref.at[1, kv_head, page], v_smem.at[slot, rows],
                                        v_barriers.at[slot])

        @pl.when(active & jnp.logical_not(packed))
        def _():
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(t0, BLOCK_Q), head], q_smem, q_barrier)

        if packed_rows:
            @pl.when(active & packed)
            def _():
                plgpu.copy_gmem_to_smem(q_ref.at[t0 + row_lo, pl.ds(packed_head0, packed_rows)],
                                        q_smem.at[pl.ds(0, packed_rows)], q_barrier)

        for stage in range(num_stages):
            pl.when(stage < num_blocks)(functools.partial(fetch, stage, stage))
        pl.when(active)(lambda: plgpu.barrier_wait(q_barrier))

        row = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, BLOCK_KV), 0, layout=plgpu.Layout.WGMMA)
        row_pos = pos_lo + (row - row_lo) * jnp.where(packed, 0, 1)  # a packed item: one token
        col = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, BLOCK_KV), 1, layout=plgpu.Layout.WGMMA)
        scale = sm_scale * LOG2E  # scores in base 2: exp2 is one instruction

        def step(block, carry, masked: bool):
            m, l, acc = carry
            slot = lax.rem(block, num_stages)
            plgpu.barrier_wait(k_barriers.at[slot])

            def scores(s_ref):
                plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                return s_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((BLOCK_Q, BLOCK_KV), jnp.float32)) * scale
            if masked:
                s = jnp.where(block * BLOCK_KV + col <= row_pos, s, MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            plgpu.barrier_wait(v_barriers.at[slot])
            if registers_p:
                def values(acc_ref):
                    plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])

                acc = pl.run_state(values)(plgpu.ACC.init(acc))  # waits: the slot is free
            else:  # interpret mode's wgmma reads its left operand from shared memory only
                p_smem = scratch[0]
                p_smem[...] = p.astype(dtype)
                plgpu.commit_smem()

                def values(pv_ref):
                    plgpu.wgmma(pv_ref, p_smem, v_smem.at[slot])
                    return pv_ref[...]  # waits for the wgmma: the slot is free after it

                acc = acc + pl.run_scoped(values, plgpu.ACC((BLOCK_Q, head_dim), jnp.float32))
            pl.when(block + num_stages < num_blocks)(
                functools.partial(fetch, block + num_stages, slot))
            return m_new, l, acc

        carry = (plgpu.layout_cast(jnp.full((BLOCK_Q,), MASK_VALUE, jnp.float32),
                                   plgpu.Layout.WGMMA.reduce(1)),
                 plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32),
                                   plgpu.Layout.WGMMA.reduce(1)),
                 plgpu.layout_cast(jnp.zeros((BLOCK_Q, head_dim), jnp.float32),
                                   plgpu.Layout.WGMMA))
        mid = jnp.minimum(num_full, num_blocks)
        carry = lax.fori_loop(0, mid, functools.partial(step, masked=False), carry)
        _, l, acc = lax.fori_loop(mid, num_blocks, functools.partial(step, masked=True), carry)
        l = jnp.where(l > 0, l, 1.0)  # the padding group reads no keys: zeros
        return (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)

    def store(out, o_smem):
        @pl.when(active)
        def _():
            o_smem[...] = out
            plgpu.commit_smem()
            pl.when(jnp.logical_not(packed))(
                lambda: _store_rows(o_smem, out_ref, head, t0, row_lo, row_hi - row_lo))
            if packed_rows:
                pl.when(packed)(lambda: plgpu.copy_smem_to_gmem(
                    o_smem.at[pl.ds(packed_row0, group)],
                    out_ref.at[t0 + row_lo, pl.ds(kv_head * group, group)]))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    out = pl.run_scoped(
        attend,
        plgpu.SMEM((BLOCK_Q, head_dim), dtype, transforms=swizzled),
        plgpu.SMEM((num_stages, BLOCK_KV, head_dim), dtype, transforms=swizzled),
        plgpu.SMEM((num_stages, BLOCK_KV, head_dim), dtype, transforms=swizzled),
        *(() if registers_p else (plgpu.SMEM((BLOCK_Q, BLOCK_KV), dtype, transforms=swizzled),)),
        plgpu.Barrier(num_arrivals=1),
        plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_stages),
        plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_stages),
    )
    # Scoped after the loop's buffers are released, so it reuses their shared memory: stored
    # from any row, so unswizzled.
    pl.run_scoped(functools.partial(store, out), plgpu.SMEM((BLOCK_Q, head_dim), dtype))


def _store_rows(o_smem, out_ref, head, t0, first_row, num_rows):
    """Copies rows [first_row, first_row + num_rows) of o_smem [BLOCK_Q, D] to
    out[t0 + first_row + i, head]: TMA boxes have static sizes, so as a ladder of boxes of
    BLOCK_Q, BLOCK_Q / 2, ..., 1 rows, one for each bit set in num_rows."""
    row = first_row
    size = BLOCK_Q
    while size >= 1:
        @pl.when(num_rows & size != 0)
        def _(row=row, size=size):
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(row, size)],
                                    out_ref.at[pl.ds(t0 + row, size), head])
        row = row + (num_rows & size)
        size //= 2


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "num_stages",
                                             "registers_p", "item_slots"))
def prefill_attention(q: jax.Array, kv_pages: jax.Array, metadata: AttentionMetadata, *,
                      sm_scale: float, interpret: bool = False, num_stages: int = NUM_STAGES,
                      registers_p: bool | None = None, item_slots: int | None = None) -> jax.Array:
    """Ragged paged attention on Hopper; same contract as reference.paged_attention_reference
    for the batches `supports` accepts.

    q: [T, Hq, D]; kv_pages: [2, Hkv, P, page_size, D]; metadata: T tokens, N sequences.
    Returns [T, Hq, D] in q.dtype, zeros for padding tokens. interpret=True runs Mosaic GPU's
    interpreter (CPU). registers_p: PV's wgmma takes the probabilities from registers (None:
    yes on GPU, where it is faster; the interpreter reads wgmma operands from shared memory only).
    item_slots: programs per query head, each striding over the items with rows (None: see
    MIN_ITEM_SLOTS).
    """
    if registers_p is None:
        registers_p = not interpret
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = kv_pages.shape[1], kv_pages.shape[3]
    items, count = work_items(metadata, num_tokens)
    kernel = functools.partial(_kernel, sm_scale=sm_scale, group=num_q_heads // num_kv_heads,
                               page_size=page_size, num_stages=num_stages,
                               registers_p=registers_p)
    slots = item_slots or min(items.shape[1], max(num_tokens // BLOCK_Q + 1, MIN_ITEM_SLOTS))
    run = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(slots, num_q_heads), grid_names=("slot", "head"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None)
    return run(count, items, metadata.block_tables.astype(jnp.int32), q, kv_pages)
