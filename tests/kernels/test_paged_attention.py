"""Paged attention on ragged batches: Pallas (interpret mode) == jnp reference == float64 numpy."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pjllm.kernels import ops, reference
from pjllm.kernels import paged_attention as pallas_attention
from pjllm.kernels.attention_metadata import AttentionMetadata
from pjllm.kernels.testing import random_ragged_layout
from tests.kernels.triton_lowering import lower_for_gpu, triton_modules

# Fixed buckets, so that each (page_size, head_dim, heads, dtype) compiles once across examples.
NUM_TOKENS = 48
NUM_SEQS = 5
MAX_CONTEXT = 80
MAX_PAGES = 10            # W: pages per sequence, enough for MAX_CONTEXT at page size 8


@dataclasses.dataclass
class Batch:
    q: np.ndarray                 # [T, Hq, D] float32
    kv_pages: np.ndarray          # [2, Hkv, P, ps, D] float32
    metadata: AttentionMetadata   # numpy-backed
    q_lens: list[int]
    ctx_lens: list[int]


@st.composite
def ragged_batches(draw, *, page_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                   num_tokens: int = NUM_TOKENS, num_seqs: int = NUM_SEQS,
                   decode_only: bool = False) -> Batch:
    """A batch of decodes and prefill chunks (some at a cached offset), padded to the buckets."""
    n = draw(st.integers(1, num_seqs))
    q_lens, ctx_lens = [], []
    budget = num_tokens
    for _ in range(n):
        if budget == 0:
            break
        if decode_only or draw(st.booleans()):
            q_len = 1
            ctx = draw(st.integers(1, MAX_CONTEXT))
        else:
            q_len = draw(st.integers(1, min(budget, 24)))
            cached = draw(st.one_of(st.just(0), st.integers(1, MAX_CONTEXT - q_len)))
            ctx = cached + q_len
        budget -= q_len
        q_lens.append(q_len)
        ctx_lens.append(ctx)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    num_pages = num_seqs * MAX_PAGES + 3
    md = random_ragged_layout(rng, q_lens, ctx_lens, page_size=page_size, num_tokens=num_tokens,
                              num_seqs=num_seqs, num_pages=num_pages, width=MAX_PAGES)
    q = rng.standard_normal((num_tokens, num_q_heads, head_dim)).astype(np.float32)
    kv = rng.standard_normal((2, num_kv_heads, num_pages, page_size, head_dim)).astype(np.float32)
    return Batch(q, kv, md, q_lens, ctx_lens)


def to_device(md: AttentionMetadata) -> AttentionMetadata:
    return jax.tree.map(jnp.asarray, md)


def naive_attention(batch: Batch, sm_scale: float, window: int | None = None,
                    slopes: np.ndarray | None = None) -> np.ndarray:
    """Per-token loops in float64, reading keys through the block table; zeros for padding.
    With a window, a token sees itself and the window - 1 keys before it; with ALiBi slopes
    [Hq], head h's scores get slopes[h] * (key position - query position)."""
    q = batch.q.astype(np.float64)
    kv = batch.kv_pages.astype(np.float64)
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_kv_heads, _, page_size, _ = kv.shape
    group = num_q_heads // num_kv_heads
    md = batch.metadata
    out = np.zeros_like(q)
    for i, (q_len, ctx) in enumerate(zip(batch.q_lens, batch.ctx_lens)):
        for k in range(q_len):
            t = md.query_start_loc[i] + k
            pos = ctx - q_len + k
            keys = np.arange(0 if window is None else max(pos - window + 1, 0), pos + 1)
            pages = md.block_tables[i, keys // page_size]
            rows = keys % page_size
            for h in range(num_q_heads):
                kk = kv[0, h // group, pages, rows]            # [pos+1, D]
                vv = kv[1, h // group, pages, rows]
                s = kk @ q[t, h] * sm_scale
                if slopes is not None:
                    s = s + slopes[h] * (keys - pos)
                w = np.exp(s - s.max())
                out[t, h] = (w / w.sum()) @ vv
    return out


def run_pallas(batch: Batch, dtype, sm_scale: float, config=None) -> np.ndarray:
    out = pallas_attention.paged_attention(
        jnp.asarray(batch.q, dtype), jnp.asarray(batch.kv_pages, dtype), to_device(batch.metadata),
        sm_scale=sm_scale, interpret=True, config=config)
    return np.asarray(out.astype(jnp.float32))


def run_reference(batch: Batch, dtype, sm_scale: float) -> np.ndarray:
    out = jax.jit(reference.paged_attention_reference, static_argnames="sm_scale")(
        jnp.asarray(batch.q, dtype), jnp.asarray(batch.kv_pages, dtype), to_device(batch.metadata),
        sm_scale=sm_scale)
    return np.asarray(out.astype(jnp.float32))


# (page_size, Hq, Hkv, head_dim, dtype): covers GQA ratios 1/4/7, page sizes 8/16/32, D 64/128.
SHAPES = [
    (8, 4, 4, 64, jnp.float32),
    (16, 8, 2, 128, jnp.float32),
    (32, 7, 1, 64, jnp.float32),
    (16, 14, 2, 64, jnp.bfloat16),
    (8, 4, 1, 128, jnp.bfloat16),
    (32, 2, 2, 128, jnp.float32),
]
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


@pytest.mark.parametrize("page_size,num_q_heads,num_kv_heads,head_dim,dtype", SHAPES)
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_pallas_matches_reference(data, page_size, num_q_heads, num_kv_heads, head_dim, dtype):
    batch = data.draw(ragged_batches(page_size=page_size, num_q_heads=num_q_heads,
                                     num_kv_heads=num_kv_heads, head_dim=head_dim))
    sm_scale = head_dim ** -0.5
    got = run_pallas(batch, dtype, sm_scale)
    want = run_reference(batch, dtype, sm_scale)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("page_size,num_q_heads,num_kv_heads,head_dim", [(16, 8, 2, 128),
                                                                         (8, 7, 1, 64)])
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_pallas_decode_bucket(data, page_size, num_q_heads, num_kv_heads, head_dim):
    """Token bucket == sequence bucket selects the decode tiles."""
    batch = data.draw(ragged_batches(page_size=page_size, num_q_heads=num_q_heads,
                                     num_kv_heads=num_kv_heads, head_dim=head_dim,
                                     num_tokens=8, num_seqs=8, decode_only=True))
    sm_scale = head_dim ** -0.5
    np.testing.assert_allclose(run_pallas(batch, jnp.float32, sm_scale),
                               naive_attention(batch, sm_scale), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("config", [
    pallas_attention.BlockConfig(block_rows=16, block_kv=16, num_warps=4, num_stages=2),
    pallas_attention.BlockConfig(block_rows=32, block_kv=128, num_warps=4, num_stages=2),
    pallas_attention.BlockConfig(block_rows=16, block_kv=16, num_warps=4, num_stages=2,
                                 kv_splits=4),
    pallas_attention.BlockConfig(block_rows=64, block_kv=32, num_warps=4, num_stages=2,
                                 kv_splits=3),
])
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_pallas_other_tiles(data, config):
    """Keys per step smaller and larger than a page; several query blocks per prefill chunk;
    split-KV (flash-decoding) partitions, some of them empty."""
    batch = data.draw(ragged_batches(page_size=32, num_q_heads=4, num_kv_heads=1, head_dim=64))
    sm_scale = 0.125
    np.testing.assert_allclose(run_pallas(batch, jnp.float32, sm_scale, config),
                               run_reference(batch, jnp.float32, sm_scale), atol=2e-5, rtol=2e-5)


BlockConfig = pallas_attention.BlockConfig


@pytest.mark.parametrize("config", [
    None,
    BlockConfig(block_rows=16, block_kv=16, num_warps=4, num_stages=2, kv_splits=3),
    BlockConfig(block_rows=32, block_kv=32, num_warps=4, num_stages=2, kv_splits=1,
                programs_per_sm=1),
    BlockConfig(block_rows=16, block_kv=16, num_warps=4, num_stages=2, kv_splits=2,
                programs_per_sm=2),
])
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_decode_tiles_mixed_small_bucket(data, config):
    """A small token bucket (T <= DECODE_MAX_TOKENS, T > N) takes the decode tiles even with
    multi-token chunks in it: several items per sequence, KV splits, a persistent grid (4
    'multiprocessors' in interpret mode) and padding tokens past N."""
    batch = data.draw(ragged_batches(page_size=16, num_q_heads=8, num_kv_heads=2, head_dim=64,
                                     num_tokens=16, num_seqs=4))
    assert pallas_attention.kernel_mode(16, 4) == "decode"
    np.testing.assert_allclose(run_pallas(batch, jnp.float32, 0.125, config),
                               naive_attention(batch, 0.125), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("config", [
    None,
    BlockConfig(block_rows=16, block_kv=16, num_warps=4, num_stages=2, kv_splits=2),
    BlockConfig(block_rows=16, block_kv=16, num_warps=4, num_stages=2, kv_splits=1,
                programs_per_sm=2),
])
def test_decode_tiles_prompt_in_a_decode_bucket(config):
    """A prompt as the engine pads it (N = T, so the decode tiles) beside decodes and a cached
    chunk: its blocks are separate items, each reading the keys up to its own tokens."""
    q_lens, ctx_lens = [29, 1, 1, 6], [29, 57, 3, 40]
    num_tokens = num_seqs = 40
    rng = np.random.default_rng(7)
    num_pages = num_seqs * MAX_PAGES + 3
    md = random_ragged_layout(rng, q_lens, ctx_lens, page_size=8, num_tokens=num_tokens,
                              num_seqs=num_seqs, num_pages=num_pages, width=MAX_PAGES)
    q = rng.standard_normal((num_tokens, 8, 64)).astype(np.float32)
    kv = rng.standard_normal((2, 2, num_pages, 8, 64)).astype(np.float32)
    batch = Batch(q, kv, md, q_lens, ctx_lens)
    assert pallas_attention.kernel_mode(num_tokens, num_seqs) == "decode"
    np.testing.assert_allclose(run_pallas(batch, jnp.float32, 0.125, config),
                               naive_attention(batch, 0.125), atol=2e-5, rtol=2e-5)


# name: (q_lens, ctx_lens, T bucket, N bucket, tiles) -- each kernel on each kind of batch, with
# one KV split and with several (block_kv 16: several key blocks per split).
PADDED_HEAD_DIM_BATCHES = {
    "decode": ([1] * 6, [80, 1, 17, 33, 64, 5], 8, 8, BlockConfig(16, 16, 4, 2, kv_splits=1)),
    "decode split": ([1] * 6, [80, 1, 17, 33, 64, 5], 8, 8, BlockConfig(16, 16, 4, 2,
                                                                          kv_splits=3)),
    "small bucket mixed": ([9, 1, 1], [40, 80, 33], 16, 4, BlockConfig(16, 16, 4, 2,
                                                                      kv_splits=2)),
    "prefill": ([24, 17], [24, 60], 48, 4, BlockConfig(32, 16, 4, 2, kv_splits=1)),
    "mixed split": ([1, 20, 1, 9], [70, 20, 33, 50], 48, 5, BlockConfig(32, 16, 4, 2,
                                                                        kv_splits=2)),
}


@pytest.mark.parametrize("head_dim,dtype", [(80, jnp.float32), (96, jnp.float32),
                                             (112, jnp.float32), (256, jnp.float32),
                                             (80, jnp.bfloat16), (112, jnp.bfloat16)])
@pytest.mark.parametrize("batch_name", list(PADDED_HEAD_DIM_BATCHES))
def test_pallas_non_power_of_two_head_dim(batch_name, dtype, head_dim):
    """Head dims the kernels pad to a power of 2 inside (the pages keep the real head_dim): the
    padding columns must neither change the scores nor leak into the output or the split-KV
    partials. 256 (no padding) rides along for its large tiles. GQA group of 7, padded to 8."""
    q_lens, ctx_lens, num_tokens, num_seqs, config = PADDED_HEAD_DIM_BATCHES[batch_name]
    rng = np.random.default_rng(head_dim)
    num_pages = num_seqs * MAX_PAGES + 3
    md = random_ragged_layout(rng, q_lens, ctx_lens, page_size=16, num_tokens=num_tokens,
                              num_seqs=num_seqs, num_pages=num_pages, width=MAX_PAGES)
    q = rng.standard_normal((num_tokens, 7, head_dim)).astype(np.float32)
    kv = rng.standard_normal((2, 1, num_pages, 16, head_dim)).astype(np.float32)
    batch = Batch(q, kv, md, q_lens, ctx_lens)
    sm_scale = head_dim ** -0.5
    got = run_pallas(batch, dtype, sm_scale, config)
    np.testing.assert_allclose(got, run_reference(batch, dtype, sm_scale),
                               atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    np.testing.assert_array_equal(got[sum(q_lens):], 0.0)


def test_select_config_nearest_table_entry():
    key = pallas_attention.shape_key
    fast = BlockConfig(16, 128, 8, 3, kv_splits=2)
    long = BlockConfig(16, 64, 4, 4, kv_splits=8)
    prefill = BlockConfig(128, 64, 8, 2)
    prefill_short = BlockConfig(64, 64, 4, 3)
    table = {key("decode", 32, 8, 128, 16, 64, 64, 2048): fast,
             key("decode", 32, 8, 128, 16, 32, 32, 8192): long,
             key("prefill", 32, 8, 128, 16, 2048, 8, 2048): prefill,
             key("prefill", 32, 8, 128, 16, 512, 8, 512): prefill_short}
    select = functools.partial(pallas_attention.select_config, head_dim=128, num_q_heads=32,
                               num_kv_heads=8, page_size=16, table=table)
    assert select(64, 64, max_context=2048) == fast
    assert select(128, 128, max_context=1024) == fast
    assert select(16, 16, max_context=16384) == long
    assert select(2048, 8, max_context=4096) == prefill
    assert select(512, 8, max_context=1024) == prefill_short
    assert select(512, 8, max_context=4096, page_size=32) == pallas_attention.DEFAULT_CONFIGS[
        "prefill"]
    # The table is tuned for 16-bit inputs; float32 takes the defaults (its tiles may not fit).
    assert select(2048, 8, max_context=4096, dtype=jnp.float32) == pallas_attention.DEFAULT_CONFIGS[
        "prefill"]
    assert select(2048, 8, max_context=4096, dtype=jnp.bfloat16) == prefill
    # The file beside the kernel parses (when there is one).
    for cfg in pallas_attention.load_tuning_table().values():
        assert isinstance(cfg, BlockConfig)


def lower_attention_for_gpu(q, kv, md: AttentionMetadata, config=None):
    """paged_attention lowered for CUDA on an abstract H200 (tests/kernels/triton_lowering.py)."""
    return lower_for_gpu(lambda q, kv, md: pallas_attention.paged_attention(
        q, kv, md, sm_scale=0.1, config=config), q, kv, md)


def lowering_inputs(num_tokens, num_seqs, num_q_heads, num_kv_heads, head_dim,
                    dtype=jnp.bfloat16):
    """(q, kv_pages, metadata) of a small batch: T // N query tokens per sequence."""
    rng = np.random.default_rng(0)
    q_lens = [num_tokens // num_seqs] * num_seqs
    md = random_ragged_layout(rng, q_lens, [50 + q for q in q_lens], page_size=16,
                              num_tokens=num_tokens, num_seqs=num_seqs, num_pages=64, width=8)
    return (jnp.zeros((num_tokens, num_q_heads, head_dim), dtype),
            jnp.zeros((2, num_kv_heads, 64, 16, head_dim), dtype), to_device(md))


# (T, N, Hq, Hkv, config): both kernels, with and without KV splits, GQA groups of 4 and 7.
LOWERING_CASES = [
    (8, 8, 32, 8, None),
    (8, 8, 28, 4, BlockConfig(16, 64, 4, 3, kv_splits=4)),
    (16, 8, 32, 8, BlockConfig(16, 128, 8, 2, kv_splits=2, programs_per_sm=1)),
    (64, 4, 28, 4, None),
    (64, 4, 32, 8, BlockConfig(64, 32, 4, 2, kv_splits=2)),
]


@pytest.mark.parametrize("head_dim", [64, 80, 96, 112, 128, 256])
@pytest.mark.parametrize("num_tokens,num_seqs,num_q_heads,num_kv_heads,config", LOWERING_CASES)
def test_triton_lowering_for_hopper(num_tokens, num_seqs, num_q_heads, num_kv_heads, config,
                                    head_dim):
    """The kernels lower to Triton for every head_dim a model may have, power of two or not
    (Triton tensors must have power-of-two sizes; interpret mode does not check that)."""
    q, kv, md = lowering_inputs(num_tokens, num_seqs, num_q_heads, num_kv_heads, head_dim)
    lowered = lower_attention_for_gpu(q, kv, md, config)
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1
    assert len(triton_modules(lowered)) == 1  # and the module passes MLIR's verifier


@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("num_tokens,num_seqs", [(8, 8), (64, 4)])        # decode, prefill tiles
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_float32_dots_are_ieee_not_tf32(dtype, num_tokens, num_seqs, head_dim):
    """Triton runs a float32 dot as TF32 (10-bit mantissa) unless the dot asks for HIGHEST: the
    kernels must, so that float32 engines get float32 attention. 16-bit dots are left as they
    were (the lowering's default, TF32, which Triton ignores for 16-bit inputs)."""
    from jax._src.pallas.triton.lowering import tt_dialect

    q, kv, md = lowering_inputs(num_tokens, num_seqs, 8, 2, head_dim, dtype)
    (module,) = triton_modules(lower_attention_for_gpu(q, kv, md))
    precisions = re.findall(r'"tt\.dot".*?inputPrecision = (\d+)', module)
    want = (tt_dialect.InputPrecision.IEEE if dtype == jnp.float32
            else tt_dialect.InputPrecision.TF32)
    assert precisions and set(precisions) == {str(int(want))}, precisions


@pytest.mark.parametrize("page_size,num_q_heads,num_kv_heads,head_dim", [(8, 4, 4, 64),
                                                                         (16, 7, 1, 128),
                                                                         (32, 8, 2, 64)])
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_reference_matches_naive(data, page_size, num_q_heads, num_kv_heads, head_dim):
    batch = data.draw(ragged_batches(page_size=page_size, num_q_heads=num_q_heads,
                                     num_kv_heads=num_kv_heads, head_dim=head_dim))
    sm_scale = head_dim ** -0.5
    want = naive_attention(batch, sm_scale)
    np.testing.assert_allclose(run_reference(batch, jnp.float32, sm_scale), want,
                               atol=2e-5, rtol=2e-5)
    dense = reference.paged_attention_dense(
        jnp.asarray(batch.q), jnp.asarray(batch.kv_pages), to_device(batch.metadata),
        sm_scale=sm_scale)
    np.testing.assert_allclose(np.asarray(dense), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("num_tokens,num_seqs,decode_only", [(1, 1, True), (8, 8, True),
                                                               (16, 5, False)])
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_reference_reads_only_each_sequences_pages(data, num_tokens, num_seqs, decode_only):
    """Small token buckets read several pages per loop step (up to the table's width, past each
    sequence's end): pages no sequence owns hold huge values, which must not leak into any
    output, and every output matches the naive per-token loop."""
    batch = data.draw(ragged_batches(page_size=8, num_q_heads=4, num_kv_heads=2, head_dim=64,
                                     num_tokens=num_tokens, num_seqs=num_seqs,
                                     decode_only=decode_only))
    md = batch.metadata
    owned = np.zeros(batch.kv_pages.shape[2], bool)
    for i, ctx in enumerate(batch.ctx_lens):
        owned[md.block_tables[i, :-(-ctx // 8)]] = True
        rows = np.arange(ctx, -(-ctx // 8) * 8)  # the last page's rows past the context
        batch.kv_pages[:, :, md.block_tables[i, rows // 8], rows % 8] = 1e30
    batch.kv_pages[:, :, ~owned] = 1e30
    got = run_reference(batch, jnp.float32, 0.125)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, naive_attention(batch, 0.125), atol=2e-5, rtol=2e-5)


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_write_kv(data):
    batch = data.draw(ragged_batches(page_size=8, num_q_heads=2, num_kv_heads=2, head_dim=64))
    rng = np.random.default_rng(0)
    num_tokens = batch.q.shape[0]
    k = rng.standard_normal((num_tokens, 2, 64)).astype(np.float32)
    v = rng.standard_normal((num_tokens, 2, 64)).astype(np.float32)
    slots = batch.metadata.slot_mapping
    before = batch.kv_pages
    after = np.asarray(jax.jit(ops.write_kv)(jnp.asarray(before), jnp.asarray(k), jnp.asarray(v),
                                             jnp.asarray(slots)))
    want = before.copy()
    for t, s in enumerate(slots):
        if s >= 0:
            want[0, :, s // 8, s % 8] = k[t]
            want[1, :, s // 8, s % 8] = v[t]
    np.testing.assert_array_equal(after, want)


def test_write_kv_padding_writes_nothing():
    kv = ops.allocate_kv_pages(num_pages=3, page_size=4, num_kv_heads=2, head_dim=8,
                               dtype=jnp.float32) + 5.0
    k = jnp.ones((6, 2, 8))
    out = ops.write_kv(kv, k, k, jnp.full((6,), -1, jnp.int32))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(kv))


@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_padded_tokens_are_finite_zeros(data):
    batch = data.draw(ragged_batches(page_size=16, num_q_heads=4, num_kv_heads=2, head_dim=64))
    num_real = int(batch.metadata.query_start_loc[-1])
    for backend in ("reference", "pallas"):
        out = np.asarray(ops.paged_attention(
            jnp.asarray(batch.q), jnp.asarray(batch.kv_pages), to_device(batch.metadata),
            sm_scale=0.125, backend=backend))
        assert np.isfinite(out).all(), backend
        np.testing.assert_array_equal(out[num_real:], 0.0)


def test_kv_cache_sizes():
    kv = ops.allocate_kv_pages(num_pages=5, page_size=16, num_kv_heads=8, head_dim=128,
                               dtype=jnp.bfloat16)
    assert kv.shape == (2, 8, 5, 16, 128) and kv.dtype == jnp.bfloat16
    assert ops.kv_cache_bytes_per_page(16, 8, 128, jnp.bfloat16) * 5 == kv.nbytes


@st.composite
def shared_prefix_batches(draw, *, page_size: int, num_q_heads: int, num_kv_heads: int,
                          head_dim: int, num_tokens: int = NUM_TOKENS,
                          num_seqs: int = NUM_SEQS) -> tuple[Batch, int]:
    """A ragged batch whose sequences all begin with the same pages (as prefix caching shares a
    system prompt), every query token past them; and the common prefix's length."""
    prefix_pages = draw(st.integers(1, 3))
    prefix_len = prefix_pages * page_size
    n = draw(st.integers(1, num_seqs))
    q_lens, ctx_lens, budget = [], [], num_tokens
    for _ in range(n):
        if budget == 0:
            break
        q_len = 1 if draw(st.booleans()) else draw(st.integers(1, min(budget, 12)))
        budget -= q_len
        q_lens.append(q_len)
        ctx_lens.append(prefix_len + draw(st.integers(0, MAX_CONTEXT - prefix_len - q_len)) + q_len)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    num_pages = num_seqs * MAX_PAGES + 3
    md = random_ragged_layout(rng, q_lens, ctx_lens, page_size=page_size, num_tokens=num_tokens,
                              num_seqs=num_seqs, num_pages=num_pages, width=MAX_PAGES,
                              shared_pages=prefix_pages)
    q = rng.standard_normal((num_tokens, num_q_heads, head_dim)).astype(np.float32)
    kv = rng.standard_normal((2, num_kv_heads, num_pages, page_size, head_dim)).astype(np.float32)
    return Batch(q, kv, md, q_lens, ctx_lens), prefix_len


@pytest.mark.parametrize("page_size,num_q_heads,num_kv_heads,head_dim,num_tokens,num_seqs", [
    (8, 4, 4, 64, NUM_TOKENS, NUM_SEQS),      # prefill tiles for the rest of each context
    (16, 8, 2, 128, 8, 8),                    # decode tiles
    (8, 7, 1, 64, 16, 4),                     # decode tiles, multi-token chunks; group 7
])
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_cascade_attention_equals_plain(data, page_size, num_q_heads, num_kv_heads, head_dim,
                                        num_tokens, num_seqs):
    """Attention told that every sequence begins with the same pages (common_prefix_len) reads
    them in one pass for the whole batch and merges that with the rest of each context: the
    same output as without the claim, for both backends; padding tokens stay zeros."""
    batch, prefix_len = data.draw(shared_prefix_batches(
        page_size=page_size, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, num_tokens=num_tokens, num_seqs=num_seqs))
    cascade = dataclasses.replace(to_device(batch.metadata),
                                  common_prefix_len=jnp.int32(prefix_len))
    want = naive_attention(batch, 0.125)
    num_real = int(batch.metadata.query_start_loc[-1])
    for backend in ("reference", "pallas"):
        got = np.asarray(ops.paged_attention(jnp.asarray(batch.q), jnp.asarray(batch.kv_pages),
                                             cascade, sm_scale=0.125, backend=backend))
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=backend)
        np.testing.assert_array_equal(got[num_real:], 0.0)


def test_prefix_kernel_lowers_for_hopper():
    """The common-prefix kernel (and the paged kernels' partials output) lower to Triton."""
    for num_tokens, num_seqs in [(64, 4), (8, 8)]:                      # ragged, decode
        q, kv, md = lowering_inputs(num_tokens, num_seqs, 32, 8, 128)

        def cascade(q, kv, md):
            return (pallas_attention.paged_attention(q, kv, md, sm_scale=0.1, partials=True),
                    pallas_attention.prefix_attention_partials(
                        q, kv, md.block_tables[0], jnp.int32(32), md.query_start_loc[-1],
                        sm_scale=0.1))

        assert len(triton_modules(lower_for_gpu(cascade, q, kv, md))) == 2


@pytest.mark.parametrize("num_tokens,num_seqs,decode_only,config", [
    (NUM_TOKENS, NUM_SEQS, False, None),                                    # prefill tiles
    (NUM_TOKENS, NUM_SEQS, False, BlockConfig(32, 16, 4, 2, kv_splits=3)),
    (8, 8, True, None),                                                      # decode tiles
    (8, 8, True, BlockConfig(16, 16, 4, 2, kv_splits=2, programs_per_sm=1)),
    (16, 4, False, BlockConfig(16, 16, 4, 2, kv_splits=2)),                  # decode, chunks
])
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_sliding_window(data, num_tokens, num_seqs, decode_only, config):
    """A sliding window (each token sees itself and window - 1 keys before it), through both
    kernels, KV splits and the persistent grid, and the reference, against the naive loop.
    Keys before a sequence's windows hold huge values, which must not leak into any output; for
    the kernels, the pages wholly before the key block holding its first window's start hold
    NaNs, which they must not even read."""
    batch = data.draw(ragged_batches(page_size=8, num_q_heads=4, num_kv_heads=2, head_dim=64,
                                     num_tokens=num_tokens, num_seqs=num_seqs,
                                     decode_only=decode_only))
    window = data.draw(st.integers(1, MAX_CONTEXT))
    md = batch.metadata
    want = naive_attention(batch, 0.125, window)
    block_kv = pallas_attention.launch_config(
        num_tokens, num_seqs, num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=8,
        max_context=min(MAX_PAGES * 8, window), config=config).block_kv
    huge, unread = batch.kv_pages.copy(), batch.kv_pages.copy()
    before_window, still_read = set(), {0}  # (unused table entries name page 0)
    for i, (q_len, ctx) in enumerate(zip(batch.q_lens, batch.ctx_lens)):
        first_seen = max(ctx - q_len - window + 1, 0)  # the first query token's window start
        rows = np.arange(first_seen)
        huge[:, :, md.block_tables[i, rows // 8], rows % 8] = 1e30
        first_read = first_seen // block_kv * block_kv // 8  # the first page of its first block
        before_window.update(md.block_tables[i, :first_read].tolist())
        still_read.update(md.block_tables[i, first_read:].tolist())
    unread[:, :, sorted(before_window - still_read)] = np.nan
    q, md = jnp.asarray(batch.q), to_device(md)
    for kv in (unread, huge):
        got = np.asarray(pallas_attention.paged_attention(
            q, jnp.asarray(kv), md, sm_scale=0.125, interpret=True, config=config,
            sliding_window=window))
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    got = np.asarray(ops.paged_attention(q, jnp.asarray(huge), md, sm_scale=0.125,
                                         backend="reference", sliding_window=window))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    dense = reference.paged_attention_dense(q, jnp.asarray(batch.kv_pages), md, sm_scale=0.125,
                                            sliding_window=window)
    np.testing.assert_allclose(np.asarray(dense), want, atol=2e-5, rtol=2e-5)


def test_sliding_window_and_alibi_kernels_lower_for_hopper():
    for num_tokens, num_seqs in [(64, 4), (8, 8)]:                      # ragged, decode
        q, kv, md = lowering_inputs(num_tokens, num_seqs, 32, 8, 128)
        lowered = lower_for_gpu(lambda q, kv, md: pallas_attention.paged_attention(
            q, kv, md, sm_scale=0.1, sliding_window=24, alibi_slopes=jnp.ones(32)), q, kv, md)
        assert len(triton_modules(lowered)) == 1


@pytest.mark.parametrize("num_tokens,num_seqs,decode_only,config", [
    (NUM_TOKENS, NUM_SEQS, False, None),                                    # prefill tiles
    (NUM_TOKENS, NUM_SEQS, False, BlockConfig(32, 16, 4, 2, kv_splits=3)),
    (8, 8, True, BlockConfig(16, 16, 4, 2, kv_splits=2, programs_per_sm=1)),  # decode tiles
    (16, 4, False, None),                                                    # decode, chunks
])
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_alibi(data, num_tokens, num_seqs, decode_only, config):
    """ALiBi slopes (BLOOM's and Falcon's position bias, one per query head; a group of 3 heads
    per KV head), alone and with a sliding window, through both kernels and the reference,
    against the naive loop."""
    batch = data.draw(ragged_batches(page_size=8, num_q_heads=6, num_kv_heads=2, head_dim=64,
                                     num_tokens=num_tokens, num_seqs=num_seqs,
                                     decode_only=decode_only))
    window = data.draw(st.one_of(st.none(), st.integers(1, MAX_CONTEXT)))
    slopes = np.asarray([2.0 ** -(i + 1) for i in range(6)], np.float32)
    want = naive_attention(batch, 0.125, window, slopes)
    args = (jnp.asarray(batch.q), jnp.asarray(batch.kv_pages), to_device(batch.metadata))
    options = dict(sm_scale=0.125, sliding_window=window, alibi_slopes=jnp.asarray(slopes))
    got = pallas_attention.paged_attention(*args, interpret=True, config=config, **options)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)
    got = ops.paged_attention(*args, backend="reference", **options)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(reference.paged_attention_dense(*args, **options)), want,
                               atol=2e-5, rtol=2e-5)
