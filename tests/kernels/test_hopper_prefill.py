"""The Mosaic GPU prefill kernel: work list, results (interpret mode) == jnp reference, and its
lowering for Hopper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pjllm.kernels import hopper_prefill, reference
from pjllm.kernels.testing import random_ragged_layout
from tests.kernels.triton_lowering import lower_for_gpu

BLOCK_Q = hopper_prefill.BLOCK_Q


@st.composite
def layouts(draw, *, num_tokens: int, num_seqs: int, max_context: int):
    """(q_lens, ctx_lens): prefill chunks (some at a cached offset) and decodes that fit in
    num_tokens, so that chunks cross the kernel's token tiles at any row."""
    q_lens, ctx_lens = [], []
    budget = num_tokens
    for _ in range(draw(st.integers(1, num_seqs))):
        if budget == 0:
            break
        q_len = draw(st.one_of(st.just(1), st.integers(1, min(budget, 2 * BLOCK_Q))))
        ctx = q_len + draw(st.one_of(st.just(0), st.integers(0, max_context - q_len)))
        budget -= q_len
        q_lens.append(q_len)
        ctx_lens.append(ctx)
    return q_lens, ctx_lens


def _metadata(q_lens, ctx_lens, *, page_size: int, num_tokens: int, num_seqs: int, width: int,
              seed: int = 0):
    rng = np.random.default_rng(seed)
    return random_ragged_layout(rng, q_lens, ctx_lens, page_size=page_size,
                                num_tokens=num_tokens, num_seqs=num_seqs,
                                num_pages=num_seqs * width + 3, width=width)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), num_tokens=st.sampled_from([64, 128, 256]))
def test_work_items_cover_each_token_once(data, num_tokens):
    num_seqs = 6
    q_lens, ctx_lens = data.draw(layouts(num_tokens=num_tokens, num_seqs=num_seqs,
                                         max_context=400))
    md = _metadata(q_lens, ctx_lens, page_size=16, num_tokens=num_tokens, num_seqs=num_seqs,
                   width=25)
    items, count = hopper_prefill.work_items(jax.tree.map(jnp.asarray, md), num_tokens)
    items = np.asarray(items)
    assert items.shape == (6, num_tokens // BLOCK_Q + num_seqs + 1)
    has_rows = items[3] > items[2]
    assert count.shape == (1,) and has_rows[:count[0]].all() and not has_rows[count[0]:].any()
    qsl = md.query_start_loc
    covered = np.zeros(num_tokens, int)
    for seq, tile, row_lo, row_hi, pos, keys in items.T:
        if row_hi == row_lo:
            continue
        assert 0 <= row_lo < row_hi <= BLOCK_Q
        tokens = np.arange(tile * BLOCK_Q + row_lo, tile * BLOCK_Q + row_hi)
        covered[tokens] += 1
        if tokens[0] >= qsl[-1]:                       # padding: no keys, so zeros
            assert keys == 0 and pos == 0
            continue
        assert qsl[seq] <= tokens[0] and tokens[-1] < qsl[seq + 1]
        first_pos = md.seq_lens[seq] - (qsl[seq + 1] - qsl[seq]) + tokens[0] - qsl[seq]
        assert pos == first_pos and keys == first_pos + len(tokens)
    np.testing.assert_array_equal(covered, 1)
    # The items with rows first (the kernel visits only those), latest tokens (most keys)
    # first.
    first_tokens = (items[1] * BLOCK_Q + items[2])[has_rows]
    assert (np.diff(first_tokens) < 0).all()


# (page_size, Hq, Hkv, head_dim, dtype, num_stages, item_slots): groups of 4 and 8 (a decode's
# heads packed into one program), 1 and 3 (one head per program); programs that stride over
# several items (2 or 3 slots for up to 8 items) or take one each (None).
SHAPES = [
    (16, 8, 2, 64, jnp.bfloat16, 2, None),
    (32, 2, 2, 128, jnp.float16, 3, 3),
    (8, 6, 2, 64, jnp.bfloat16, 2, None),
    (16, 8, 1, 64, jnp.bfloat16, 2, 2),
]


@pytest.mark.parametrize(
    "page_size,num_q_heads,num_kv_heads,head_dim,dtype,num_stages,item_slots", SHAPES)
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_matches_reference(data, page_size, num_q_heads, num_kv_heads, head_dim, dtype,
                           num_stages, item_slots):
    """Chunks crossing tiles, several sequences in one tile, contexts of several key blocks
    (so the stages wrap, also from one item to the next), decodes, and padding tokens (zeros)."""
    num_tokens, num_seqs, width = 128, 5, 320 // page_size
    q_lens, ctx_lens = data.draw(layouts(num_tokens=num_tokens, num_seqs=num_seqs,
                                         max_context=width * page_size))
    md = jax.tree.map(jnp.asarray, _metadata(
        q_lens, ctx_lens, page_size=page_size, num_tokens=num_tokens, num_seqs=num_seqs,
        width=width, seed=data.draw(st.integers(0, 2**31 - 1))))
    num_pages = md.block_tables.size + 3
    keys = jax.random.split(jax.random.key(len(q_lens)))
    q = jax.random.normal(keys[0], (num_tokens, num_q_heads, head_dim), jnp.float32).astype(dtype)
    kv = jax.random.normal(keys[1], (2, num_kv_heads, num_pages, page_size, head_dim),
                           jnp.float32).astype(dtype)
    scale = head_dim ** -0.5
    # Waited for before anything else runs: the interpreter's callbacks dispatch jax ops from
    # their own threads, and can deadlock with eager ops on this one.
    got = jax.block_until_ready(hopper_prefill.prefill_attention(
        q, kv, md, sm_scale=scale, interpret=True, num_stages=num_stages,
        item_slots=item_slots))
    want = jax.jit(reference.paged_attention_reference, static_argnames="sm_scale")(
        q, kv, md, sm_scale=scale)
    got, want = (np.asarray(x.astype(jnp.float32)) for x in (got, want))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(got[sum(q_lens):], 0.0)


@pytest.mark.parametrize("registers_p", [False, True])
@pytest.mark.parametrize("page_size,head_dim", [(16, 128), (32, 64), (64, 256)])
def test_lowers_for_hopper(registers_p, page_size, head_dim):
    """Mosaic GPU's lowering (layout inference, TMA and wgmma shapes) accepts the kernel; the
    register-P variant, which interpret mode cannot run, is at least checked this far on CPU."""
    num_tokens, num_seqs, width = 256, 4, -(-300 // page_size)
    md = jax.tree.map(jnp.asarray, _metadata([200, 1, 40], [300, 90, 40], page_size=page_size,
                                             num_tokens=num_tokens, num_seqs=num_seqs,
                                             width=width))
    q = jax.ShapeDtypeStruct((num_tokens, 8, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 2, md.block_tables.size, page_size, head_dim), jnp.bfloat16)
    lowered = lower_for_gpu(lambda q, kv: hopper_prefill.prefill_attention(
        q, kv, md, sm_scale=0.1, registers_p=registers_p), q, kv)
    assert "mosaic_gpu" in lowered.as_text()


def test_supports():
    def q(tokens=128, dim=128, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct((tokens, 8, dim), dtype)

    def kv(page_size=16, dim=128, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct((2, 2, 10, page_size, dim), dtype)

    plain = dict(sliding_window=None, alibi=False)
    assert hopper_prefill.supports(q(), kv(), **plain)
    assert hopper_prefill.supports(q(dim=256, dtype=jnp.float16), kv(dim=256, dtype=jnp.float16),
                                   **plain)
    assert not hopper_prefill.supports(q(dtype=jnp.float32), kv(dtype=jnp.float32), **plain)
    assert not hopper_prefill.supports(q(dim=96), kv(dim=96), **plain)
    assert not hopper_prefill.supports(q(tokens=100), kv(), **plain)
    assert not hopper_prefill.supports(q(), kv(page_size=128), **plain)
    assert not hopper_prefill.supports(q(), kv(), sliding_window=64, alibi=False)
    assert not hopper_prefill.supports(q(), kv(), sliding_window=None, alibi=True)


def test_ops_dispatch(monkeypatch):
    """On a Hopper GPU, ops.paged_attention gives this kernel the prefill-mode batches it
    supports, and leaves decode buckets, float32, windows and ALiBi to the Triton kernels."""
    from pjllm.kernels import ops

    monkeypatch.setattr(hopper_prefill, "on_hopper", lambda: True)

    def runs(num_tokens=2048, num_seqs=256, dtype=jnp.bfloat16, window=None, alibi=None):
        q = jax.ShapeDtypeStruct((num_tokens, 8, 128), dtype)
        kv = jax.ShapeDtypeStruct((2, 2, 10, 16, 128), dtype)
        md = jax.tree.map(jnp.asarray, _metadata([num_tokens], [num_tokens], page_size=16,
                                                 num_tokens=num_tokens, num_seqs=num_seqs,
                                                 width=num_tokens // 16))
        return ops._runs_on_hopper_kernel(q, kv, md, window, alibi)

    assert runs()
    assert not runs(num_tokens=256, num_seqs=256)        # a decode bucket (the Triton kernel)
    assert not runs(dtype=jnp.float32)
    assert not runs(window=128)
    assert not runs(alibi=jnp.ones((8,), jnp.float32))
    monkeypatch.setattr(hopper_prefill, "on_hopper", lambda: False)
    assert not runs()
