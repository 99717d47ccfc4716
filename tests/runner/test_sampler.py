"""Tests for pjllm.runner.sampler (CPU, seconds)."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pjllm.runner import sampler
from pjllm.runner.sampler import (
    SORT_FREE_TOP_K,
    SamplerFlags,
    SamplerOutput,
    SamplingMetadata,
    apply_penalties,
    apply_top_k_top_p,
    largest_values,
    argmax_rows,
    compute_logprobs,
    sample,
)

_sample_jit = jax.jit(sample, static_argnames="flags")


def _sample(logits, metadata, flags, token_ids=None):
    """sample() jitted; rows have no token history unless `token_ids` i32[N, L] is given."""
    if flags.use_penalties and token_ids is None:
        token_ids = np.full((logits.shape[0], 1), -1, np.int32)
    return _sample_jit(logits, metadata, flags, token_ids if flags.use_penalties else None)


RANDOM = SamplerFlags()  # non-greedy, no costly stage (min-p and bans are applied by data)
ALL_ON = SamplerFlags(use_top_k_top_p=True, use_penalties=True, num_logprobs=3)


def make_metadata(n: int, **overrides) -> SamplingMetadata:
    """Metadata for n rows: temperature 1, every filter off, seed = row index."""
    fields = dict(
        temperature=np.ones(n, np.float32),
        top_k=np.zeros(n, np.int32),
        top_p=np.ones(n, np.float32),
        min_p=np.zeros(n, np.float32),
        presence_penalty=np.zeros(n, np.float32),
        frequency_penalty=np.zeros(n, np.float32),
        repetition_penalty=np.ones(n, np.float32),
        seeds=np.arange(n, dtype=np.uint32),
        sample_index=np.zeros(n, np.int32),
        step=np.zeros(n, np.int32),
        prompt_lens=np.zeros(n, np.int32),
        banned_token_ids=np.zeros((n, 0), np.int32),
        search_rows=np.full(sampler.few_searched_rows(n), n, np.int32),
    )
    for name, value in overrides.items():
        assert name in fields, name
        value = np.asarray(value, dtype=fields[name].dtype)
        # Per-row fields broadcast to [n]; id lists to [n, L] (a 1-D list is shared by all rows).
        shape = ((n,) if name != "search_rows" else value.shape) if fields[name].ndim == 1 else (
            n, value.shape[-1])
        fields[name] = np.broadcast_to(value, shape).copy()
    return SamplingMetadata(**{k: jnp.asarray(v) for k, v in fields.items()})


def history(prompt: np.ndarray, output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(token_ids i32[N, Lp + Lo], prompt_lens i32[N]) of -1 padded prompt and output lists, as
    the runner gathers them: each row's prompt, then its output, then -1."""
    rows = []
    for p, o in zip(prompt, output):
        rows.append([t for t in p if t >= 0] + [t for t in o if t >= 0])
    width = max(prompt.shape[1] + output.shape[1], 1)
    ids = np.full((len(rows), width), -1, np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    return ids, np.array([(np.asarray(p) >= 0).sum() for p in prompt], np.int32)


def draws(logits_row: np.ndarray, n: int, flags: SamplerFlags = RANDOM, **overrides) -> np.ndarray:
    """Sample the same logits row n times with seeds 0..n-1; returns i32[n] tokens."""
    logits = np.broadcast_to(np.asarray(logits_row, np.float32), (n, len(logits_row)))
    out = _sample(jnp.asarray(logits), make_metadata(n, **overrides), flags)
    return np.asarray(out.token_ids)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 50)).astype(np.float32)
    want = logits.argmax(-1)
    md = make_metadata(7, temperature=0.0)
    out = _sample(jnp.asarray(logits), md, SamplerFlags())
    np.testing.assert_array_equal(out.token_ids, want)
    # Mixed path: temperature 0 and tiny temperatures are greedy rows, filters compiled in or not.
    temps = np.array([0, 1e-7, 0, 1e-6, 0, 0, 0], np.float32)
    out = _sample(jnp.asarray(logits), make_metadata(7, temperature=temps, top_p=0.9), ALL_ON)
    np.testing.assert_array_equal(out.token_ids, want)
    assert out.token_ids.dtype == jnp.int32


def test_row_sample_independent_of_position_and_batch():
    rng = np.random.default_rng(1)
    v = 1000
    target = rng.normal(size=v).astype(np.float32) * 0.1  # nearly flat: the sample is all noise
    seed, idx, step = 1234, 2, 17
    results = []
    for flags in (RANDOM, ALL_ON):
        per_flags = []
        for n, pos in [(1, 0), (4, 3), (16, 5), (16, 0), (64, 40)]:
            logits = rng.normal(size=(n, v)).astype(np.float32)
            logits[pos] = target
            seeds = rng.integers(0, 2**31, size=n).astype(np.uint32)
            idxs = rng.integers(0, 4, size=n)
            steps = rng.integers(0, 100, size=n)
            temps = rng.uniform(0.0, 2.0, size=n)
            seeds[pos], idxs[pos], steps[pos], temps[pos] = seed, idx, step, 1.0
            md = make_metadata(n, seeds=seeds, sample_index=idxs, step=steps, temperature=temps)
            per_flags.append(int(_sample(jnp.asarray(logits), md, flags).token_ids[pos]))
        assert len(set(per_flags)) == 1, per_flags
        results.append(per_flags[0])
    # The unused filters (top_k=0, top_p=1, min_p=0, no penalties) do not change the draw.
    assert results[0] == results[1]


def test_seed_sample_index_and_step_all_matter():
    v = 1000
    flat = np.zeros(v, np.float32)
    n = 256
    by_seed = draws(flat, n)
    assert len(set(by_seed.tolist())) > 200
    by_index = draws(flat, n, seeds=7, sample_index=np.arange(n))
    assert len(set(by_index.tolist())) > 200
    by_step = draws(flat, n, seeds=7, step=np.arange(n))
    assert len(set(by_step.tolist())) > 200
    # Deterministic: the same call twice gives the same tokens.
    np.testing.assert_array_equal(by_seed, draws(flat, n))


def test_int32_and_uint32_seeds_agree():
    flat = np.zeros(500, np.float32)
    seeds = np.array([0, 1, 2**31 - 1, 2**32 - 1, 2**31], np.uint64)
    a = draws(flat, 5, seeds=seeds.astype(np.uint32))
    md = dataclasses.replace(
        make_metadata(5), seeds=jnp.asarray(seeds.astype(np.uint32).view(np.int32))
    )
    b = _sample(jnp.broadcast_to(jnp.asarray(flat), (5, 500)), md, RANDOM).token_ids
    np.testing.assert_array_equal(a, b)


def test_sampling_follows_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    n = 20000
    freq = np.bincount(draws(logits, n), minlength=4) / n
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.02)
    # Temperature 2 flattens the distribution as softmax(logits / 2).
    freq = np.bincount(draws(logits, n, temperature=2.0), minlength=4) / n
    np.testing.assert_allclose(freq, softmax(logits / 2), atol=0.02)


def test_top_k_one_is_greedy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(64, 300)).astype(np.float32)
    flags = SamplerFlags(use_top_k_top_p=True)
    md = make_metadata(64, top_k=1, temperature=1.5)
    out = _sample(jnp.asarray(logits), md, flags)
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))


def test_top_k_never_samples_outside_top_k():
    rng = np.random.default_rng(3)
    v, k = 200, 5
    row = rng.normal(size=v).astype(np.float32) * 0.3  # nearly flat: without top-k, anything goes
    top = set(np.argsort(-row)[:k].tolist())
    got = draws(row, 4000, SamplerFlags(use_top_k_top_p=True), top_k=k)
    assert set(got.tolist()) == top
    # Off values: 0, -1 and >= V keep the full vocabulary.
    for off in (0, -1, v, v + 7):
        got = draws(row, 2000, SamplerFlags(use_top_k_top_p=True), top_k=off)
        assert len(set(got.tolist())) > 150


def test_top_p_small_is_greedy():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(64, 300)).astype(np.float32)
    md = make_metadata(64, top_p=1e-6)
    out = _sample(jnp.asarray(logits), md, SamplerFlags(use_top_k_top_p=True))
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))


def test_top_p_keeps_nucleus_with_renormalized_frequencies():
    probs = np.array([0.06, 0.25, 0.04, 0.4, 0.1, 0.15], np.float32)  # shuffled on purpose
    logits = np.log(probs)
    # Descending: 0.4, 0.25, 0.15 | 0.1, ... ; mass before 0.15 is 0.65 < 0.7, before 0.1 is 0.8.
    n = 20000
    got = draws(logits, n, SamplerFlags(use_top_k_top_p=True), top_p=0.7)
    nucleus = [3, 1, 5]
    assert set(got.tolist()) == set(nucleus)
    freq = np.bincount(got, minlength=6) / n
    want = np.zeros(6)
    want[nucleus] = probs[nucleus] / probs[nucleus].sum()
    np.testing.assert_allclose(freq, want, atol=0.02)


def test_top_k_then_top_p_renormalizes_over_top_k():
    probs = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    # top_k=2 renormalizes to [4/7, 3/7]; top_p=0.5 then keeps only token 0 (4/7 >= 0.5).
    got = draws(np.log(probs), 500, SamplerFlags(use_top_k_top_p=True), top_k=2, top_p=0.5)
    assert set(got.tolist()) == {0}
    # With top_p=0.6 the pair is kept (4/7 < 0.6).
    got = draws(np.log(probs), 2000, SamplerFlags(use_top_k_top_p=True), top_k=2, top_p=0.6)
    assert set(got.tolist()) == {0, 1}


def test_min_p_filters():
    probs = np.array([0.3, 0.05, 0.2, 0.12, 0.08, 0.25], np.float32)
    # min_p=0.35 -> threshold 0.105: keep 0.3, 0.2, 0.12, 0.25; drop 0.05, 0.08.
    n = 20000
    got = draws(np.log(probs), n, RANDOM, min_p=0.35)
    kept = [0, 2, 3, 5]
    assert set(got.tolist()) == set(kept)
    freq = np.bincount(got, minlength=6) / n
    want = np.zeros(6)
    want[kept] = probs[kept] / probs[kept].sum()
    np.testing.assert_allclose(freq, want, atol=0.02)
    # min_p = 0 is off.
    got = draws(np.log(probs), 4000, RANDOM, min_p=0.0)
    assert set(got.tolist()) == set(range(6))


def numpy_penalties(logits, prompt, output, rep, freq, pres):
    """vLLM reference: repetition on prompt+output, then frequency and presence on output."""
    out = logits.astype(np.float64).copy()
    n, v = logits.shape
    for i in range(n):
        counts = np.zeros(v)
        for t in output[i]:
            if t >= 0:
                counts[t] += 1
        seen = counts > 0
        for t in prompt[i]:
            if t >= 0:
                seen[t] = True
        row = out[i]
        row[seen] = np.where(row[seen] > 0, row[seen] / rep[i], row[seen] * rep[i])
        row -= freq[i] * counts
        row -= pres[i] * (counts > 0)
    return out


def test_penalties_match_numpy_reference():
    rng = np.random.default_rng(5)
    n, v = 6, 40
    logits = rng.normal(size=(n, v)).astype(np.float32) * 3
    prompt = rng.integers(0, v, size=(n, 12))
    prompt[:, 9:] = -1
    output = rng.integers(0, 10, size=(n, 15))  # duplicates on purpose
    output[:, 11:] = -1
    output[4] = -1  # nothing generated yet
    rep = np.array([1.0, 1.3, 0.8, 2.0, 1.5, 1.0], np.float32)
    freq = np.array([0.0, 0.5, -0.3, 0.2, 0.7, 0.0], np.float32)
    pres = np.array([0.0, 0.4, 0.1, -0.5, 1.0, 0.0], np.float32)
    token_ids, prompt_lens = history(prompt, output)
    md = make_metadata(
        n,
        prompt_lens=prompt_lens,
        repetition_penalty=rep,
        frequency_penalty=freq,
        presence_penalty=pres,
    )
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), token_ids, md))
    want = numpy_penalties(logits, prompt, output, rep, freq, pres)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[[0, 5]], logits[[0, 5]])  # all-off rows untouched

    # Through sample(): greedy picks the argmax of the penalized logits.
    out = _sample(
        jnp.asarray(logits),
        dataclasses.replace(md, temperature=jnp.zeros(n)),
        SamplerFlags(use_penalties=True),
        token_ids,
    )
    np.testing.assert_array_equal(out.token_ids, want.argmax(-1))


def test_penalties_change_greedy_choice():
    logits = np.array([[5.0, 4.0, 1.0, -1.0]], np.float32)
    flags = SamplerFlags(use_penalties=True)

    def pick(prompt=(-1,), output=(-1,), **kw):
        token_ids, prompt_lens = history(np.array([prompt]), np.array([output]))
        md = make_metadata(1, temperature=0.0, prompt_lens=prompt_lens, **kw)
        return int(_sample(jnp.asarray(logits), md, flags, token_ids).token_ids[0])

    assert pick(output=[0, -1], presence_penalty=2.0) == 1
    assert pick(output=[0, 0], frequency_penalty=0.6) == 1  # 5 - 1.2 < 4
    assert pick(output=[0], frequency_penalty=0.4) == 0  # 5 - 0.4 > 4
    assert pick(prompt=[0, -1, -1], repetition_penalty=1.5) == 1  # 5 / 1.5 < 4
    assert pick(prompt=[0], frequency_penalty=2.0) == 0  # prompt tokens count for repetition only
    assert pick(prompt=[-1], repetition_penalty=1.5) == 0  # padding is ignored


def test_banned_tokens_never_sampled():
    rng = np.random.default_rng(6)
    v = 30
    row = rng.normal(size=v).astype(np.float32)
    order = np.argsort(-row)
    banned = np.array([order[0], order[1], -1, order[2], -1], np.int32)
    flags = SamplerFlags()  # bans are applied by data in every program
    got = draws(row, 3000, flags, banned_token_ids=banned)
    assert not set(got.tolist()) & set(order[:3].tolist())
    assert len(set(got.tolist())) > 15
    # Greedy rows skip to the best allowed token.
    greedy = draws(row, 4, flags, banned_token_ids=banned, temperature=0.0)
    assert set(greedy.tolist()) == {int(order[3])}
    # Padding-only ban lists change nothing.
    same = draws(row, 4, flags, banned_token_ids=[-1, -1], temperature=0.0)
    assert set(same.tolist()) == {int(order[0])}


def test_logprobs_are_raw_log_softmax_at_sampled_ids():
    rng = np.random.default_rng(7)
    n, v = 32, 64
    logits = rng.normal(size=(n, v)).astype(np.float32) * 2
    token_ids, prompt_lens = history(rng.integers(0, v, size=(n, 3)), rng.integers(0, v, size=(n, 4)))
    md = make_metadata(
        n,
        temperature=rng.uniform(0, 2, size=n),
        top_k=10,
        top_p=0.8,
        min_p=0.05,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        prompt_lens=prompt_lens,
        banned_token_ids=rng.integers(0, v, size=(n, 2)),
    )
    out = _sample(jnp.asarray(logits), md, ALL_ON, token_ids)
    assert isinstance(out, SamplerOutput)
    raw = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    ids = np.asarray(out.token_ids)
    np.testing.assert_allclose(out.logprobs.logprobs, raw[np.arange(n), ids], rtol=1e-6, atol=1e-6)
    # Ranks: 1 + the tokens strictly more likely than the sampled one, in the top 3 or not.
    want_ranks = 1 + (raw > raw[np.arange(n), ids][:, None]).sum(axis=-1)
    np.testing.assert_array_equal(out.logprobs.ranks, want_ranks)
    assert (want_ranks > 3).any()  # some sampled tokens lie outside the top 3
    # Top logprobs: sorted descending, equal to the true top-3 of the raw distribution.
    assert out.logprobs.top_ids.shape == (n, 3) and out.logprobs.top_logprobs.shape == (n, 3)
    top = np.asarray(out.logprobs.top_logprobs)
    assert np.all(np.diff(top, axis=-1) <= 0)
    np.testing.assert_array_equal(out.logprobs.top_ids, np.argsort(-raw, axis=-1)[:, :3])
    np.testing.assert_allclose(top, -np.sort(-raw, axis=-1)[:, :3], rtol=1e-6, atol=1e-6)


def test_compute_logprobs_shapes_and_bf16():
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.normal(size=(5, 20)), jnp.bfloat16)
    targets = jnp.array([0, 3, 19, 7, 7], jnp.int32)
    out = jax.jit(compute_logprobs, static_argnums=2)(logits, targets, 0)
    assert out.top_ids.shape == (5, 0) and out.top_logprobs.shape == (5, 0)
    assert out.logprobs.dtype == jnp.float32
    want = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[jnp.arange(5), targets]
    np.testing.assert_allclose(out.logprobs, want, rtol=1e-6)
    out = compute_logprobs(logits, targets, 20)
    assert out.top_ids.shape == (5, 20) and np.all(np.diff(np.asarray(out.top_logprobs), axis=-1) <= 0)
    # The rank of a token is its place in the top list (no ties among these logits).
    for row, target in enumerate(np.asarray(targets)):
        assert out.ranks[row] == list(np.asarray(out.top_ids[row])).index(target) + 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_padding_rows_have_no_nan(temperature):
    n, v = 4, 16
    logits = jnp.zeros((n, v), jnp.float32)
    md = make_metadata(
        n,
        temperature=temperature,
        top_p=np.array([1.0, 0.5, 0.0, 1.0]),
        top_k=np.array([0, 3, 0, 1]),
        banned_token_ids=np.full((n, 2), -1),
    )
    for flags in (RANDOM, ALL_ON, SamplerFlags(num_logprobs=2)):
        out = _sample(logits, md, flags)
        for leaf in jax.tree_util.tree_leaves(out):
            assert np.all(np.isfinite(np.asarray(leaf))), flags
        ids = np.asarray(out.token_ids)
        assert np.all((ids >= 0) & (ids < v))
        np.testing.assert_allclose(out.logprobs.logprobs, -np.log(v), rtol=1e-6)


def test_sort_only_compiled_when_top_k_top_p_requested():
    logits = jnp.zeros((4, 32), jnp.float32)
    md = make_metadata(4)

    def jaxpr(flags):
        history = jnp.full((4, 3), -1, jnp.int32) if flags.use_penalties else None
        return str(jax.make_jaxpr(sample, static_argnums=2)(logits, md, flags, history))

    def has_sort(flags):
        return re.search(r"\bsort\[", jaxpr(flags)) is not None

    assert not has_sort(dataclasses.replace(ALL_ON, use_top_k_top_p=False, num_logprobs=0))
    assert has_sort(SamplerFlags(use_top_k_top_p=True))


def numpy_top_k_top_p(logits, top_k, top_p):
    """vLLM's top-k then top-p by a full sort of each row, in float64; ties at the cut are kept."""
    out = np.full_like(logits, -np.inf)
    for i, row in enumerate(logits.astype(np.float64)):
        desc = np.sort(row)[::-1]
        k = len(row) if top_k[i] <= 0 or top_k[i] >= len(row) else top_k[i]
        probs = np.exp(desc[:k] - desc[0])
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        n_keep = k if top_p[i] >= 1.0 else max(int(np.sum(before < top_p[i])), 1)
        out[i] = np.where(row >= desc[n_keep - 1], logits[i], -np.inf)
    return out


@pytest.fixture(params=[32, 4], ids=["lax-top-k", "block-candidates"])
def candidate_block(request, monkeypatch):
    """Both ways `largest_values` takes a row's largest logits: lax.top_k itself (the test
    vocabularies are too short for 32-wide blocks to pay) and from the k blocks with the largest
    maxima (4-wide blocks)."""
    monkeypatch.setattr(sampler, "CANDIDATE_BLOCK", request.param)
    return request.param


def test_sort_free_top_k_matches_full_sort_and_numpy(candidate_block):
    rng = np.random.default_rng(9)
    n, v = 12, 3000
    # Rounded logits: many exact ties, some of them at the top-k cut.
    logits = np.round(rng.normal(size=(n, v)) * 4) / 4
    logits = logits.astype(np.float32)
    top_k = np.array([1, 2, 5, 20, 50, 64, 100, 128, 0, -1, 50, 128], np.int32)
    top_p = np.array([1.0, 0.5, 0.9, 0.95, 0.95, 1.0, 0.3, 0.99, 1.0, 1.0, 1e-6, 0.8], np.float32)
    filter_fn = jax.jit(apply_top_k_top_p, static_argnames="method")
    sort_free = np.asarray(filter_fn(jnp.asarray(logits), top_k, top_p, method="top_k_prefix"))
    full = np.asarray(filter_fn(jnp.asarray(logits), top_k, top_p, method="sort"))
    np.testing.assert_array_equal(sort_free, full)
    for method in ("nucleus", "bisect"):
        searched = np.asarray(filter_fn(jnp.asarray(logits), top_k, top_p, method=method))
        np.testing.assert_array_equal(searched, full)
    np.testing.assert_array_equal(sort_free, numpy_top_k_top_p(logits, top_k, top_p))
    assert SORT_FREE_TOP_K == 128  # the rows above sit on both sides of the bound
    # Rows beyond the largest logits: top_p alone (nucleus and bisect), top_k above the bound
    # (bisect only).
    top_k[[0, 8]] = 0
    top_p[[0, 8]] = [0.9, 0.6]
    want = numpy_top_k_top_p(logits, top_k, top_p)
    for method in ("sort", "nucleus", "bisect"):
        got = np.asarray(filter_fn(jnp.asarray(logits), top_k, top_p, method=method))
        np.testing.assert_array_equal(got, want, err_msg=method)
    few = np.asarray(filter_fn(jnp.asarray(logits), top_k, top_p, method="nucleus_few",
                               search_rows=np.array([8, 0, n], np.int32)))  # n: padding
    np.testing.assert_array_equal(few, want)
    top_k[[3, 9]] = [129, 2000]
    top_p[[3, 9]] = [0.97, 1.0]
    want = numpy_top_k_top_p(logits, top_k, top_p)
    for method in ("sort", "bisect"):
        got = np.asarray(filter_fn(jnp.asarray(logits), top_k, top_p, method=method))
        np.testing.assert_array_equal(got, want, err_msg=method)


@pytest.mark.parametrize("seed", range(6))
def test_searched_thresholds_match_a_sort(seed, candidate_block):
    """The GPU's sort-free thresholds keep exactly what vLLM's sorted top-k then top-p keeps:
    ties at the top-k cut (top-p renormalizes over exactly k tokens), -inf entries (bans,
    min-p), top_k off or beyond the vocabulary, tiny and whole top_p."""
    rng = np.random.default_rng(seed)
    n, v = 16, 3000
    logits = rng.normal(size=(n, v)) * 3
    if seed % 2 == 0:
        logits = np.round(logits * 4 / 3) / 4  # many exact ties
    logits = logits.astype(np.float32)
    logits[0, :5] = -np.inf
    logits[1, 100:] = -np.inf
    top_k = rng.choice([0, -1, 1, 2, 5, 20, 50, 128, 129, 500, 2999, 3000, 5000], size=n).astype(np.int32)
    top_p = rng.choice([1.0, 0.5, 0.9, 0.95, 0.99, 1e-6, 0.3], size=n).astype(np.float32)
    filter_fn = jax.jit(apply_top_k_top_p, static_argnames="method")
    bisected = filter_fn(jnp.asarray(logits), top_k, top_p, method="bisect")
    np.testing.assert_array_equal(np.asarray(bisected), numpy_top_k_top_p(logits, top_k, top_p))
    # The nucleus search serves rows with top_k off or within the largest logits.
    top_k = np.where((top_k > SORT_FREE_TOP_K) & (top_k < v), 0, top_k)
    nucleus = filter_fn(jnp.asarray(logits), top_k, top_p, method="nucleus")
    want = numpy_top_k_top_p(logits, top_k, top_p)
    np.testing.assert_array_equal(np.asarray(nucleus), want)
    # The few rows' search, gathered: the rows that need it, in any order, then padding.
    searched = np.flatnonzero((top_p < 1) & ((top_k <= 0) | (top_k >= v)))[::-1]
    few = filter_fn(jnp.asarray(logits), top_k, top_p, method="nucleus_few",
                    search_rows=np.append(searched, [n, n]).astype(np.int32))
    np.testing.assert_array_equal(np.asarray(few), want)


def _sorted_widths(jaxpr) -> list[int]:
    """The row length of every sort and top_k in a jaxpr (nested ones included)."""
    widths = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("sort", "top_k"):
            widths.append(eqn.invars[0].aval.shape[-1])
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                widths += _sorted_widths(inner)
    return widths


def test_searched_thresholds_and_top_logprobs_sort_no_row_of_the_vocabulary():
    v = 20_000
    for method in ("nucleus_few", "nucleus", "bisect"):
        widths = _sorted_widths(jax.make_jaxpr(sample, static_argnums=2)(
            jnp.zeros((4, v), jnp.float32), make_metadata(4),
            SamplerFlags(use_top_k_top_p=True, threshold_method=method, num_logprobs=20)).jaxpr)
        # Block maxima and candidates only (v / 32 and 128 x 32), never the vocabulary.
        assert widths and max(widths) <= SORT_FREE_TOP_K * sampler.CANDIDATE_BLOCK < v, widths


@pytest.mark.parametrize("k", [1, 3, 16, 20, 33, 128])
def test_largest_values_is_lax_top_k(k, candidate_block):
    rng = np.random.default_rng(k)
    x = np.round(rng.normal(size=(6, 3001)) * 8) / 8  # ties, and a last block cut short
    x[1] = 0.0  # every value tied
    x[2, ::7] = 50.0  # more ties at the top than k
    x = jnp.asarray(x, jnp.float32)
    want, got = jax.lax.top_k(x, k), jax.jit(largest_values, static_argnums=1)(x, k)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_top_k_rows_sample_the_same_with_or_without_the_sort():
    """A row with a small top_k draws the same token whether or not another row in its batch
    (top_p alone, top_k above SORT_FREE_TOP_K) made the step sort the vocabulary."""
    rng = np.random.default_rng(10)
    n, v = 8, 2000
    logits = (rng.normal(size=(n, v)) * 2).astype(np.float32)
    small_k = dict(top_k=np.array([50, 20, 1, 128, 50, 7, 100, 64]),
                   top_p=np.array([0.95, 1.0, 1.0, 0.5, 0.9, 1.0, 0.99, 0.8]),
                   temperature=np.array([0.8, 1.0, 1.3, 0.7, 0.0, 1.0, 0.5, 1.1]),
                   seeds=np.arange(100, 100 + n), step=np.arange(n))
    sort_free = SamplerFlags(use_top_k_top_p=True, threshold_method="top_k_prefix")
    full_sort = SamplerFlags(use_top_k_top_p=True)
    want = _sample(jnp.asarray(logits), make_metadata(n, **small_k), sort_free).token_ids
    got = _sample(jnp.asarray(logits), make_metadata(n, **small_k), full_sort).token_ids
    np.testing.assert_array_equal(got, want)
    for method in ("nucleus_few", "nucleus", "bisect"):
        searched = SamplerFlags(use_top_k_top_p=True, threshold_method=method)
        got = _sample(jnp.asarray(logits), make_metadata(n, **small_k), searched).token_ids
        np.testing.assert_array_equal(got, want)
    # The same rows next to rows that need the sort (the batch order changes nothing either).
    mixed = {name: np.concatenate([value[::-1], value]) for name, value in small_k.items()}
    mixed["top_k"][:n] = [0, 500, 0, 0, 300, 0, 0, 0]
    both = np.concatenate([logits[::-1], logits])
    got = _sample(jnp.asarray(both), make_metadata(2 * n, **mixed), full_sort).token_ids
    np.testing.assert_array_equal(np.asarray(got)[n:], want)


def test_sort_free_top_k_sorts_nothing():
    logits = jnp.zeros((4, 300), jnp.float32)
    jaxpr = str(jax.make_jaxpr(sample, static_argnums=2)(
        logits, make_metadata(4), SamplerFlags(use_top_k_top_p=True, threshold_method="top_k_prefix")))
    assert re.search(r"\bsort\[", jaxpr) is None and "top_k[" in jaxpr


def test_argmax_rows_matches_numpy_argmax():
    rng = np.random.default_rng(11)
    x = np.round(rng.normal(size=(6, 1000)) * 2).astype(np.float32)  # ties: the first one wins
    x[1] = -np.inf
    x[2, [7, 400]] = np.nan
    x[3, 5] = np.inf
    x[4] = 0.0
    np.testing.assert_array_equal(jax.jit(argmax_rows)(jnp.asarray(x)), np.argmax(x, axis=-1))
