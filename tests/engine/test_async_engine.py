"""AsyncLLM: many asyncio callers share one batch; refusals, aborts, overload, a dead loop and
shutdown each end every request with an answer and free its pages."""

import asyncio
import time

import numpy as np
import pytest

from pjllm import SamplingParams
from pjllm.engine.async_engine import AsyncLLM, EngineDeadError, EngineOverloadedError

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
OPTIONS = dict(load_format="dummy", dtype="float32", max_model_len=128, page_size=8, max_num_seqs=8,
               max_num_batched_tokens=64, seed=0, compilation_cache_dir=None)


@pytest.fixture(scope="module")
def engine(tiny_model_path_module):
    engine = AsyncLLM(tiny_model_path_module, **OPTIONS)
    yield engine
    engine.shutdown()


def _prompts(count, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, 240, rng.integers(4, 20)).tolist()} for _ in range(count)]


async def _final(engine, prompt, params, request_id):
    outputs = [output async for output in engine.generate(prompt, params, request_id)]
    assert outputs[-1].finished and all(not o.finished for o in outputs[:-1])
    return outputs


def _assert_idle(engine):
    """Nothing running, waiting or holding pages, as the core last reported (it reports after
    every step, an abort's too)."""
    for _ in range(100):
        stats = engine.stats
        if (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0) \
                and not engine._streams:
            return
        time.sleep(0.05)
    raise AssertionError(f"not idle: {engine.stats}, streams {list(engine._streams)}")


def test_concurrent_callers_get_what_llm_generate_gives(engine, tiny_model_path_module):
    import pjllm

    prompts = _prompts(6)
    with pjllm.LLM(tiny_model_path_module, **OPTIONS) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]

    async def run():
        return await asyncio.gather(*[_final(engine, p, GREEDY, f"r{i}") for i, p in enumerate(prompts)])

    results = asyncio.run(run())
    assert [outputs[-1].outputs[0].token_ids for outputs in results] == expected
    # Tokens arrive step by step: a caller sees its output grow, never shrink.
    for outputs in results:
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        assert lengths == sorted(lengths) and len(outputs) > 1
    _assert_idle(engine)


def test_refused_request_raises_before_any_output_and_the_engine_goes_on(engine):
    async def run():
        with pytest.raises(ValueError, match="prompt_token_ids must be in"):
            await _final(engine, {"prompt_token_ids": [10**6]}, GREEDY, "bad")
        return await _final(engine, _prompts(1)[0], GREEDY, "bad")  # the id is free again

    assert asyncio.run(run())[-1].outputs[0].finish_reason == "length"
    _assert_idle(engine)


def test_a_cancelled_caller_aborts_its_request_and_frees_its_pages(engine):
    long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)

    async def run():
        async def read_two():
            count = 0
            async for _ in engine.generate(_prompts(1, seed=3)[0], long, "cancelled"):
                count += 1
                if count == 2:
                    await asyncio.sleep(10)  # a client that stops reading, then goes away
        task = asyncio.create_task(read_two())
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        other = await _final(engine, _prompts(1, seed=4)[0], GREEDY, "other")
        return other

    assert asyncio.run(run())[-1].finished
    _assert_idle(engine)


def test_overload_is_refused_with_its_own_error(tiny_model_path_module):
    small = AsyncLLM(tiny_model_path_module, max_waiting_requests=1, **OPTIONS)
    try:
        small._cores[0].num_unseen_adds += 1  # one request sent, not yet reported by the core

        async def run():
            with pytest.raises(EngineOverloadedError, match="max_waiting_requests 1"):
                await _final(small, _prompts(1)[0], GREEDY, "over")

        asyncio.run(run())
        small._cores[0].num_unseen_adds -= 1
    finally:
        small.shutdown()


def test_a_dead_core_fails_its_callers_and_says_so(tiny_model_path_module):
    fragile = AsyncLLM(tiny_model_path_module, **OPTIONS)
    long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    try:
        async def run():
            stream = fragile.generate(_prompts(1)[0], long, "doomed")
            await anext(stream)
            fragile._cores[0].process.kill()  # the core process dies mid-request
            with pytest.raises(EngineDeadError, match="engine core stopped"):
                async for _ in stream:
                    pass
            with pytest.raises(EngineDeadError):
                await _final(fragile, _prompts(1)[0], GREEDY, "late")

        asyncio.run(run())
        assert not fragile.is_running
    finally:
        fragile.shutdown()


def test_shutdown_ends_running_requests_with_abort(tiny_model_path_module):
    doomed = AsyncLLM(tiny_model_path_module, **OPTIONS)
    long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)

    async def run():
        stream = doomed.generate(_prompts(1)[0], long, "running")
        first = await anext(stream)
        doomed.shutdown()
        outputs = [first] + [output async for output in stream]
        return outputs[-1]

    last = asyncio.run(run())
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert not doomed.is_running


def test_two_replicas_serve_what_one_engine_gives_and_aborts_reach_their_replica(
        tiny_model_path_module):
    """data_parallel_size=2: two core processes; greedy, seeded and unseeded requests give one
    engine's tokens (the front end draws unseeded requests' seeds in arrival order, as one
    engine does), both replicas get work, and an abort stops the request on its own replica."""
    import pjllm

    prompts = _prompts(6, seed=7)
    choices = [GREEDY, SamplingParams(temperature=1.0, max_tokens=8, seed=5, ignore_eos=True),
               SamplingParams(temperature=0.9, max_tokens=6, ignore_eos=True)]
    params = [choices[i % 3] for i in range(len(prompts))]
    with pjllm.LLM(tiny_model_path_module, **OPTIONS) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine = AsyncLLM(tiny_model_path_module, data_parallel_size=2, **OPTIONS)
    long = SamplingParams(temperature=0.0, max_tokens=100, seed=0, ignore_eos=True)
    try:
        async def run():
            finals = await asyncio.gather(*[_final(engine, p, s, f"r{i}")
                                            for i, (p, s) in enumerate(zip(prompts, params))])
            streams = [engine.generate(prompts[i], long, f"long{i}") for i in range(2)]
            for stream in streams:
                await anext(stream)
            assert {engine._streams[f"long{i}"].core.replica for i in range(2)} == {0, 1}
            ends = []
            for i, stream in enumerate(streams):
                engine.abort(f"long{i}")
                ends.append([output async for output in stream][-1])
            return finals, ends

        finals, ends = asyncio.run(run())
        assert [outputs[-1].outputs[0].token_ids for outputs in finals] == expected
        assert all(end.finished and end.outputs[0].finish_reason == "abort" for end in ends)
        assert all(len(end.outputs[0].token_ids) < 100 for end in ends)
        # Both replicas looked prompts up in their prefix caches, i.e. both got requests.
        assert all(core.stats.prefix_cache_queries > 0 for core in engine._cores)
        _assert_idle(engine)  # the replicas' combined stats
    finally:
        engine.shutdown()
