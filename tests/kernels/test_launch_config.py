"""The kernel's public description of a launch (`num_work_items`, `launch_config`), which the tools
(the kernels bench, benchmarks/tune_kernels.py) report instead of recomputing it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pjllm.kernels import paged_attention as pa
from pjllm.kernels.testing import random_ragged_layout

HEADS = dict(num_q_heads=4, num_kv_heads=2)
HEAD_DIM, PAGE_SIZE, CONTEXT = 32, 16, 128


@pytest.mark.parametrize("q_lens, ctx_lens, num_tokens, num_seqs, block_q", [
    ([9, 1, 20], [30, 5, 20], 48, 4, 8),      # a prefill bucket
    ([40], [40], 48, 48, 4),                  # one prompt in a decode bucket (N = T): T items
    ([1] * 30 + [3], [7] * 30 + [5], 48, 48, 4),
    ([1] * 16, [9] * 16, 16, 16, 4),          # all decodes: the bound T is reached exactly
])
def test_work_list_covers_each_token_once(q_lens, ctx_lens, num_tokens, num_seqs, block_q):
    """`num_work_items` items, as `_work_items` fills them, hold every token of [0, T) once, each
    real one with its own sequence and position, and at most block_q tokens per item."""
    md = random_ragged_layout(np.random.default_rng(0), q_lens, ctx_lens, page_size=PAGE_SIZE,
                              num_tokens=num_tokens, num_seqs=num_seqs, num_pages=64, width=4)
    count = pa.num_work_items(num_tokens, num_seqs, block_q)
    assert count == min((num_tokens + num_seqs * (block_q - 1)) // block_q + 1, num_tokens)
    items = np.asarray(pa._work_items(jax.tree.map(jnp.asarray, md), num_tokens, block_q))
    assert items.shape == (5, count)
    seq, first, end, pos0, n_keys = items
    assert ((end - first) <= block_q).all()
    covered = np.concatenate([np.arange(a, b) for a, b in zip(first, end)])
    np.testing.assert_array_equal(np.sort(covered), np.arange(num_tokens))
    qsl, lens = md.query_start_loc, md.seq_lens
    for i in np.flatnonzero(first < qsl[len(q_lens)]):
        s = seq[i]
        assert qsl[s] <= first[i] < end[i] <= qsl[s + 1]
        assert pos0[i] == lens[s] - (qsl[s + 1] - first[i])
        assert n_keys[i] == pos0[i] + end[i] - first[i]


def test_launch_config_keeps_a_given_split_count_and_resolves_a_free_one():
    fixed = pa.BlockConfig(16, 64, 4, 2, kv_splits=3)
    assert pa.launch_config(4, 4, head_dim=64, page_size=16, max_context=8192, config=fixed,
                            num_q_heads=8, num_kv_heads=2) == fixed
    free = pa.BlockConfig(16, 64, 4, 2, kv_splits=None)
    # decode: one program per (sequence, kv head), 8 of them; splits double while 2x the programs
    # stay within TARGET_PROGRAMS and each split keeps >= 4 key blocks.
    launched = pa.launch_config(4, 4, head_dim=64, page_size=16, max_context=8192, config=free,
                                num_q_heads=8, num_kv_heads=2)
    assert launched == pa.BlockConfig(16, 64, 4, 2, kv_splits=32)
    assert pa.launch_config(4, 4, head_dim=64, page_size=16, max_context=80, config=free,
                            num_q_heads=8, num_kv_heads=2).kv_splits == 1


@pytest.mark.parametrize("q_lens, num_tokens, tiles", [
    ([1, 1], 2, (32, 16)),            # decode tiles
    ([20, 5], 32, (16, 16)),          # prefill tiles: work items of 8 tokens
])
def test_kernel_runs_with_the_split_count_launch_config_reports(q_lens, num_tokens, tiles):
    """Left free, the split count the kernel picks is the one launch_config reports: both runs
    launch the same programs, so their outputs agree to the bit."""
    num_seqs = len(q_lens)
    free = pa.BlockConfig(*tiles, 4, 2, kv_splits=None)
    launched = pa.launch_config(num_tokens, num_seqs, head_dim=HEAD_DIM, page_size=PAGE_SIZE,
                                max_context=CONTEXT, config=free, **HEADS)
    assert launched.kv_splits > 1
    rng = np.random.default_rng(1)
    num_pages = num_seqs * CONTEXT // PAGE_SIZE
    md = random_ragged_layout(rng, q_lens, [CONTEXT] * num_seqs, page_size=PAGE_SIZE, num_tokens=num_tokens,
                              num_seqs=num_seqs, num_pages=num_pages, width=CONTEXT // PAGE_SIZE)
    md = jax.tree.map(jnp.asarray, md)
    q = jnp.asarray(rng.standard_normal((num_tokens, 4, HEAD_DIM)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((2, 2, num_pages, PAGE_SIZE, HEAD_DIM)), jnp.float32)
    runs = [pa.paged_attention(q, kv, md, sm_scale=HEAD_DIM ** -0.5, interpret=True, config=config)
            for config in (free, launched)]
    np.testing.assert_array_equal(np.asarray(runs[0]), np.asarray(runs[1]))
    halved = dataclasses.replace(launched, kv_splits=launched.kv_splits // 2)
    other = pa.paged_attention(q, kv, md, sm_scale=HEAD_DIM ** -0.5, interpret=True, config=halved)
    assert not np.array_equal(np.asarray(other), np.asarray(runs[0]))  # the check can tell them apart
