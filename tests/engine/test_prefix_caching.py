"""Automatic prefix caching, end to end on the tiny random-weight Llama: a request reuses the
cached pages of an earlier one's prompt, computes only the rest, and generates exactly what it
would with caching off."""

import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pjllm
from pjllm import SamplingParams
from pjllm.runner import model_runner

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PAGE = 8


def _tokens(seed: int, count: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 256, count).tolist()


def _generate(llm, prompts, params=GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def test_a_shared_prefix_is_computed_once(make_llm):
    cached, uncached = make_llm(page_size=PAGE), make_llm(page_size=PAGE, enable_prefix_caching=False)
    prefix = _tokens(0, 3 * PAGE)  # three full pages
    first, second = prefix + _tokens(1, 5), prefix + _tokens(2, 11)
    for llm in (cached, uncached):
        [out_first] = _generate(llm, [first])
        assert out_first.num_cached_tokens == 0
    [out_second] = _generate(cached, [second])
    [expected] = _generate(uncached, [second])
    # The second request prefills only its 11-token suffix.
    assert out_second.num_cached_tokens == 3 * PAGE and expected.num_cached_tokens == 0
    assert out_second.outputs[0].token_ids == expected.outputs[0].token_ids
    manager = cached.engine.kv_cache_manager
    assert (manager.num_queried_tokens, manager.num_hit_tokens) == (len(first) + len(second), 3 * PAGE)


def test_prompt_logprobs_are_computed_not_read_from_the_cache(make_llm):
    cached, uncached = make_llm(page_size=PAGE), make_llm(page_size=PAGE, enable_prefix_caching=False)
    prefix = _tokens(3, 2 * PAGE)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=2,
                            logprobs=2)
    _generate(cached, [prefix + _tokens(4, 3)])
    prompt = prefix + _tokens(5, 6)
    [got] = _generate(cached, [prompt], params)
    [want] = _generate(uncached, [prompt], params)
    assert got.num_cached_tokens == 0
    assert got.prompt_logprobs == want.prompt_logprobs and got.prompt_logprobs[1] is not None
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert got.outputs[0].logprobs == want.outputs[0].logprobs


def test_a_prompt_cached_whole_still_computes_its_last_token(make_llm):
    llm = make_llm(page_size=PAGE)
    prompt = _tokens(6, 3 * PAGE)
    [first] = _generate(llm, [prompt])
    [again] = _generate(llm, [prompt])
    # Its last page is recomputed: the logits of its last token sample the first output.
    assert again.num_cached_tokens == 2 * PAGE
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_cache_salt_separates_requests(make_llm):
    llm = make_llm(page_size=PAGE)
    prompt = _tokens(7, 2 * PAGE + 3)

    def cached_tokens(salt):
        request = {"prompt_token_ids": prompt} | ({"cache_salt": salt} if salt else {})
        return llm.generate(request, GREEDY, use_tqdm=False)[0].num_cached_tokens

    assert cached_tokens("alice") == 0
    assert cached_tokens("bob") == 0
    assert cached_tokens(None) == 0
    assert (cached_tokens("alice"), cached_tokens("bob"), cached_tokens(None)) == (2 * PAGE,) * 3


def test_reset_prefix_cache_forgets_every_prefix(make_llm):
    llm = make_llm(page_size=PAGE)
    prompt = _tokens(8, 2 * PAGE + 1)
    _generate(llm, [prompt])
    assert llm.reset_prefix_cache() is True
    assert _generate(llm, [prompt])[0].num_cached_tokens == 0
    assert _generate(llm, [prompt])[0].num_cached_tokens == 2 * PAGE


def test_n_sequences_share_their_prompt_pages(make_llm):
    llm = make_llm(page_size=PAGE, max_num_batched_tokens=128)
    prompt = _tokens(9, 4 * PAGE + 2)
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=1, ignore_eos=True)
    engine = llm.engine
    engine.add_request("r", {"prompt_token_ids": prompt}, params)
    engine.step()  # schedules the four prefills; they are in flight
    manager = engine.kv_cache_manager
    held = manager.num_pages - manager.num_free_pages
    # One copy of the 4 full prompt pages, and each branch's own last page: 4 + 4, not 4 x 5.
    assert held == 4 + 4
    while engine.has_unfinished_requests():
        engine.step()


def test_n_branches_are_reproducible_and_equal_without_sharing(make_llm):
    """Seeded branches of an n = 4 request give the same tokens run again (their prompt then all
    cached) and with caching off (no page shared)."""
    prompt = _tokens(13, 4 * PAGE + 3)
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    shared, separate = make_llm(page_size=PAGE), make_llm(page_size=PAGE, enable_prefix_caching=False)
    runs = [[c.token_ids for c in _generate(llm, [prompt], params)[0].outputs]
            for llm in (shared, shared, separate)]
    assert runs[0] == runs[1] == runs[2]
    assert len({tuple(tokens) for tokens in runs[0]}) > 1


def test_cascade_attention_changes_no_output(make_llm, monkeypatch):
    """Eight requests after one cached system prompt: their steps read it once through cascade
    attention (its programs ran), with the same tokens and logprobs as without. (The tiny
    model's context is 256 tokens: the prompt is 64, the thresholds lowered to match.)"""
    monkeypatch.setattr(model_runner, "MIN_CASCADE_PREFIX_TOKENS", 64)
    monkeypatch.setattr(model_runner, "MIN_CASCADE_SHARED_TOKENS", 8 * 64)
    options = dict(page_size=PAGE, max_num_batched_tokens=128)
    system = _tokens(12, 64)
    prompts = [system + _tokens(30 + i, 3 + 2 * i) for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    results = []
    for disable in (False, True):
        llm = make_llm(disable_cascade_attn=disable, **options)
        _generate(llm, [system + [7]])  # caches the system prompt
        outputs = _generate(llm, prompts, params)
        assert all(o.num_cached_tokens == 64 for o in outputs)
        cascades = [key for key in llm.engine.model_runner.programs.keys() if "cascade" in key]
        assert bool(cascades) == (not disable)
        results.append(outputs)
    for got, want in zip(*results):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
            assert {t: lp.logprob for t, lp in a.items()} == pytest.approx(
                {t: lp.logprob for t, lp in b.items()}, abs=1e-4)


def test_alibi_models_build_no_cascade_programs():
    """BLOOM's layers all take ALiBi biases, which cascade attention's shared-prefix pass lacks:
    its engine builds no cascade programs, and a shared prefix still hits the cache."""
    golden = pathlib.Path(__file__).parent.parent / "golden" / "bloom"
    with pjllm.LLM(str(golden), dtype="float32", max_model_len=128, page_size=PAGE,
                   max_num_seqs=4, max_num_batched_tokens=64, compilation_cache_dir=None,
                   skip_tokenizer_init=True) as llm:
        assert not llm.engine.model_runner.cascade_attention
        system = _tokens(12, 4 * PAGE)
        _generate(llm, [system + [7]])
        outputs = _generate(llm, [system + _tokens(30 + i, 3) for i in range(4)])
        assert all(o.num_cached_tokens == 4 * PAGE for o in outputs)
        assert not [key for key in llm.engine.model_runner.programs.keys() if "cascade" in key]


@pytest.fixture(scope="module")
def tight_pair(tiny_model_path_module):
    """Two engines on 24 pages of 8 tokens, with prefix caching on and off."""
    options = dict(load_format="dummy", dtype="float32", max_model_len=128, page_size=PAGE,
                   num_pages=24, max_num_seqs=8, max_num_batched_tokens=64, seed=0,
                   compilation_cache_dir=None)
    pair = (pjllm.LLM(tiny_model_path_module, **options),
            pjllm.LLM(tiny_model_path_module, enable_prefix_caching=False, **options))
    yield pair
    for llm in pair:
        llm.shutdown()


@settings(max_examples=8, deadline=None)
@given(
    prefix_groups=st.lists(st.integers(0, 2), min_size=3, max_size=7),
    suffix_lens=st.lists(st.integers(1, 20), min_size=7, max_size=7),
    arrivals=st.lists(st.integers(0, 6), min_size=7, max_size=7),
    aborts=st.dictionaries(st.integers(0, 6), st.integers(0, 10), max_size=2),
)
def test_random_streams_match_caching_off(tight_pair, prefix_groups, suffix_lens, arrivals, aborts):
    """Request streams sharing prefixes, arriving at different steps, some aborted, on a page
    budget small enough to evict cached pages and preempt: what finishes equals caching off,
    and every page is free again at the end (none leaked, none freed twice)."""
    prefixes = [_tokens(10, 2 * PAGE), _tokens(11, 3 * PAGE + 4), []]
    prompts = [prefixes[group] + _tokens(20 + i, suffix_lens[i])
               for i, group in enumerate(prefix_groups)]
    results = []
    for llm in tight_pair:
        engine, finished, step = llm.engine, {}, 0
        pending = sorted(zip(arrivals, range(len(prompts))))
        while pending or engine.has_unfinished_requests():
            while pending and pending[0][0] <= step:
                index = pending.pop(0)[1]
                engine.add_request(f"r{index}", {"prompt_token_ids": prompts[index]}, GREEDY)
            for index, abort_step in aborts.items():
                if abort_step == step and index < len(prompts):
                    engine.abort_request(f"r{index}")
            for output in engine.step():
                if output.finished and output.outputs[0].finish_reason == "length":
                    finished[output.request_id] = output.outputs[0].token_ids
            step += 1
        results.append(finished)
        manager = engine.kv_cache_manager
        manager.check_invariants([])
        assert manager.num_free_pages == manager.num_pages
    with_cache, without = results
    for request_id in with_cache.keys() & without.keys():
        assert with_cache[request_id] == without[request_id]
