"""The engine under a server's traffic: random arrivals, aborts, reused ids, tight pages, and steps
that fail. Every request ends exactly once, nothing leaks, and a failure stays with its requests."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pjllm import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
# Prompts of the "bad" requests in the failure tests start with this token; no other prompt does.
POISON = 250


def _prompt(rng, low=3, high=30):
    return rng.integers(3, 240, rng.integers(low, high)).tolist()


def _greedy_baseline(llm, seed, num_prompts, low, high, max_tokens):
    """Prompts, greedy params and the tokens an undisturbed run gives them. The prefix cache is
    emptied after, so the run under test prefills the prompts as the baseline did (the steps a
    fault hits are the same)."""
    rng = np.random.default_rng(seed)
    prompts = [_prompt(rng, low, high) for _ in range(num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in
                llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    llm.reset_prefix_cache()
    return prompts, params, expected


def _assert_idle_and_clean(engine):
    assert not engine.has_unfinished_requests()
    assert engine.requests == {}
    kv = engine.kv_cache_manager
    assert kv.num_free_pages == kv.num_pages, "pages leaked"


def _drain(engine, finals):
    """Steps until idle; appends every final output step() returns to `finals`."""
    while engine.has_unfinished_requests():
        finals += [out for out in engine.step() if out.finished]


def test_a_request_stopping_on_a_stop_token_ends_once(make_llm):
    llm = make_llm()
    prompt = [5, 6, 7, 8, 9]
    tokens = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = tokens[2]
    engine = llm.engine
    engine.add_request("a", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_at],
                                      ignore_eos=True))
    finals = []
    _drain(engine, finals)
    assert [out.request_id for out in finals] == ["a"]
    completion = finals[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_at
    assert completion.token_ids == tokens[:tokens.index(stop_at) + 1]


def test_a_finished_id_can_be_reused_at_once(make_llm):
    """The old request's speculative step is still in flight when its id names a new request."""
    llm = make_llm()
    engine = llm.engine
    penalized = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, repetition_penalty=1.2)
    solo = llm.generate({"prompt_token_ids": [9, 8, 7]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, penalized)
    finals = []
    while not finals:
        finals += [out for out in engine.step() if out.finished]
    engine.add_request("a", {"prompt_token_ids": [9, 8, 7]}, GREEDY)
    _drain(engine, finals)
    assert [out.request_id for out in finals] == ["a", "a"]
    assert finals[0].prompt_token_ids == [5, 6, 7] and finals[1].prompt_token_ids == [9, 8, 7]
    assert finals[1].outputs[0].token_ids == solo
    _assert_idle_and_clean(engine)
    # And an aborted id, reused while its steps are in flight, is abortable again.
    engine.add_request("b", {"prompt_token_ids": [5, 6, 7]}, GREEDY)
    engine.step()
    engine.step()
    assert engine.abort_request("b").outputs[0].finish_reason == "abort"
    engine.add_request("b", {"prompt_token_ids": [5, 6, 7]}, GREEDY)
    engine.step()
    aborted = engine.abort_request("b")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert engine.abort_request("b") is None
    finals = []
    _drain(engine, finals)
    assert finals == []
    _assert_idle_and_clean(engine)


def _poison_prepare(engine):
    """Makes every step in which a POISON-prompt request joins the runner's batch fail while
    preparing its inputs: in turn before and after the runner applied the step's message."""
    prepare, failures = engine.model_runner.prepare, []

    def failing_prepare(message):
        if any(new.token_ids[0] == POISON for new in message.new_seqs):
            failures.append(1)
            if len(failures) % 2 == 0:
                prepare(message)
            raise OverflowError("injected: a value the device cannot take")
        return prepare(message)

    engine.model_runner.prepare = failing_prepare


def test_a_failing_request_finishes_with_the_error_and_the_engine_goes_on(make_llm):
    llm = make_llm()
    rng = np.random.default_rng(3)
    prompts = [_prompt(rng) for _ in range(3)]
    expected = [o.outputs[0].token_ids for o in
                llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)]
    _poison_prepare(llm.engine)
    for _ in range(2):  # the message lost before the runner applied it, then after
        (bad,) = llm.generate({"prompt_token_ids": [POISON, 4, 5]}, GREEDY, use_tqdm=False)
        assert bad.finished
        assert bad.outputs[0].finish_reason.startswith("error: OverflowError: injected")
        # The engine serves the next call, and the same requests give the same tokens.
        again = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == expected
    _assert_idle_and_clean(llm.engine)


def test_a_step_failing_on_device_fails_its_requests_and_the_rest_recompute(make_llm):
    llm = make_llm(num_pages=40, max_num_batched_tokens=32)
    engine = llm.engine
    prompts, params, expected = _greedy_baseline(llm, 4, 6, 10, 30, max_tokens=20)
    fetch, calls = engine.model_runner.fetch, []

    def fetch_failing_once(handle):
        calls.append(handle)
        if len(calls) == 2:
            raise RuntimeError("injected: the device failed")
        return fetch(handle)

    engine.model_runner.fetch = fetch_failing_once
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    finals = []
    _drain(engine, finals)
    by_id = {out.request_id: out for out in finals}
    assert len(by_id) == len(finals) == 6
    failed = [rid for rid, out in by_id.items() if out.outputs[0].finish_reason.startswith("error")]
    assert failed and len(failed) < 6
    assert engine.scheduler.num_preemptions > 0  # the step in flight after the failure is redone
    for i in range(6):
        if f"r{i}" not in failed:
            assert by_id[f"r{i}"].outputs[0].token_ids == expected[i], i
            assert by_id[f"r{i}"].outputs[0].finish_reason == "length"
    _assert_idle_and_clean(engine)


def test_a_failure_while_reading_a_steps_tokens_stays_with_its_request(make_llm):
    """A host-side error after the device step (detokenizing, stop checks) fails that request only."""
    llm = make_llm()
    engine = llm.engine
    expected = llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)[0]
    append = engine._append_token

    def failing_append(seq, *args):
        if seq.token_ids[0] == POISON:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        append(seq, *args)

    engine._append_token = failing_append
    bad, good = llm.generate([{"prompt_token_ids": [POISON, 6, 7]}, {"prompt_token_ids": [5, 6, 7]}],
                             GREEDY, use_tqdm=False)
    assert bad.outputs[0].finish_reason.startswith("error: UnicodeDecodeError")
    assert good.outputs[0].token_ids == expected.outputs[0].token_ids
    _assert_idle_and_clean(engine)


def test_a_launch_that_loses_the_kv_cache_is_recovered(make_llm):
    """A launch that fails after taking the donated KV cache: its requests fail, the cache is
    rebuilt, and the sequences running beside them are recomputed to the same tokens."""
    llm = make_llm(max_num_batched_tokens=32)
    engine = llm.engine
    prompts, params, expected = _greedy_baseline(llm, 5, 6, 20, 30, max_tokens=12)
    dispatch, calls = engine.model_runner.dispatch, []

    def dispatch_losing_the_cache(batch, variant):
        calls.append(1)
        if len(calls) == 2:
            for pages in engine.model_runner.kv_caches:
                pages.delete()
            raise RuntimeError("injected: the launch failed")
        return dispatch(batch, variant)

    engine.model_runner.dispatch = dispatch_losing_the_cache
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    finals = []
    _drain(engine, finals)
    by_id = {out.request_id: out.outputs[0] for out in finals}
    failed = [rid for rid, c in by_id.items() if c.finish_reason.startswith("error")]
    assert len(by_id) == 6 and 0 < len(failed) < 6
    for i in range(6):
        if f"r{i}" not in failed:
            assert by_id[f"r{i}"].token_ids == expected[i]
    _assert_idle_and_clean(engine)


def test_an_interrupted_step_loses_no_request(make_llm):
    """Ctrl-C while a step waits for the device, with the engine driven directly: the requests
    are recomputed and finish with the tokens they would have had."""
    llm = make_llm()
    engine = llm.engine
    rng = np.random.default_rng(6)
    prompts = [_prompt(rng) for _ in range(3)]
    expected = [o.outputs[0].token_ids for o in
                llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)]
    fetch, calls = engine.model_runner.fetch, []

    def interrupted_fetch(handle):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fetch(handle)

    engine.model_runner.fetch = interrupted_fetch
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, GREEDY)
    finals = []
    with pytest.raises(KeyboardInterrupt):
        _drain(engine, finals)
    _drain(engine, finals)
    assert sorted(out.request_id for out in finals) == ["r0", "r1", "r2"]
    for out in finals:
        assert out.outputs[0].token_ids == expected[int(out.request_id[1:])]
    _assert_idle_and_clean(engine)


def test_an_interrupted_generate_leaves_the_engine_ready(make_llm):
    llm = make_llm()
    step, calls = llm.engine.step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    llm.engine.step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 3, GREEDY, use_tqdm=False)
    del llm.engine.step
    (out,) = llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
    _assert_idle_and_clean(llm.engine)


_PARAMS = [
    GREEDY,
    SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[7, 11, 13, 17, 19, 23]),
    SamplingParams(temperature=0.9, top_p=0.9, top_k=20, max_tokens=9, seed=7, ignore_eos=True),
    SamplingParams(temperature=0.8, max_tokens=6, presence_penalty=0.5, repetition_penalty=1.1,
                   ignore_eos=True),
    SamplingParams(n=2, temperature=1.0, max_tokens=7, logprobs=2, min_tokens=3, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=12, min_tokens=4, stop_token_ids=[2, 5, 9, 31]),
]

_EVENTS = st.lists(st.tuples(st.sampled_from(["add", "add", "add", "abort", "reuse", "poison"]),
                             st.integers(0, len(_PARAMS) - 1), st.integers(0, 10**6)),
                   min_size=4, max_size=24)


@pytest.fixture(scope="module")
def soak_llms(tiny_model_path_module):
    """(tight, roomy): one engine with pages for about two sequences, whose steps fail when they
    hold a POISON prompt, and one with room to spare for reference outputs. Built once, so that
    the examples share their compiled programs."""
    import pjllm

    options = dict(load_format="dummy", dtype="float32", max_model_len=128, page_size=8,
                   max_num_seqs=4, max_num_batched_tokens=32, seed=0, compilation_cache_dir=None)
    tight = pjllm.LLM(tiny_model_path_module, num_pages=20, **options)
    _poison_prepare(tight.engine)
    return tight, pjllm.LLM(tiny_model_path_module, **options)


@settings(max_examples=6, deadline=None)
@given(events=_EVENTS)
def test_soak_every_request_ends_exactly_once(soak_llms, events):
    """Random arrivals, aborts, id reuse and poisoned requests under tight pages, one engine step
    per event: each request gets exactly one final output (an aborted one: from abort_request,
    none from step), greedy ones match a roomy engine, and nothing is left behind."""
    llm, roomy = soak_llms
    engine = llm.engine
    submitted, live, ended, reusable = [], {}, {}, []

    def end(request_id, output):
        index = live.pop(request_id, None)
        assert index is not None, f"a final output for {request_id!r}, which is not live"
        assert index not in ended
        ended[index] = output
        reusable.append(request_id)

    for kind, which, salt in events:
        rng = np.random.default_rng(salt)
        if kind in ("add", "poison", "reuse"):
            request_id = (reusable.pop(salt % len(reusable)) if kind == "reuse" and reusable
                          else f"r{len(submitted)}")
            prompt = _prompt(rng)
            if kind == "poison":
                prompt[0] = POISON
            engine.add_request(request_id, {"prompt_token_ids": prompt}, _PARAMS[which])
            live[request_id] = len(submitted)
            submitted.append((prompt, _PARAMS[which], kind))
        elif kind == "abort" and live:
            request_id = sorted(live)[salt % len(live)]
            output = engine.abort_request(request_id)
            assert output.finished
            assert all(c.finish_reason is not None for c in output.outputs)
            end(request_id, output)
        for output in engine.step():
            if output.finished:
                end(output.request_id, output)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                end(output.request_id, output)
    assert not live and sorted(ended) == list(range(len(submitted)))
    _assert_idle_and_clean(engine)

    greedy = []
    for index, (prompt, params, kind) in enumerate(submitted):
        reasons = [c.finish_reason for c in ended[index].outputs]
        if kind == "poison":
            assert all(r == "abort" or r.startswith("error:") for r in reasons), reasons
        if params is GREEDY and reasons == ["length"]:
            greedy.append(index)
    if greedy:
        want = roomy.generate([{"prompt_token_ids": submitted[i][0]} for i in greedy], GREEDY,
                              use_tqdm=False)
        assert [ended[i].outputs[0].token_ids for i in greedy] == [o.outputs[0].token_ids
                                                                   for o in want]
