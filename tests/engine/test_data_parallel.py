"""Data parallelism offline, on eight CPU devices: replicas on disjoint devices give what one
engine gives (transformers' goldens; the same sampled tokens, seeded or not), requests are
spread over them, and too few devices is refused naming both sizes."""

import jax
import numpy as np
import pytest

import pjllm
from pjllm.engine.router import ReplicaRouter
from tests.golden_outputs import GOLDEN, assert_matches_golden

GOLDEN_OPTIONS = dict(dtype="float32", max_model_len=128, page_size=8, max_num_seqs=4,
                      max_num_batched_tokens=32, compilation_cache_dir=None,
                      skip_tokenizer_init=True, attention_backend="reference")


@pytest.fixture(scope="module")
def two_replicas():
    """Two replicas of one device each; the tests using it pass seeds (except the one that
    checks the seeds drawn for unseeded requests), so they draw none from the engine's generator."""
    with pjllm.LLM(str(GOLDEN / "llama2"), data_parallel_size=2, **GOLDEN_OPTIONS) as llm:
        yield llm


def _device_ids(arrays):
    return {device.id for array in arrays for device in array.sharding.device_set}


def test_the_router_picks_the_replica_with_the_fewest_outstanding_requests():
    router = ReplicaRouter(3, seed=0)
    assert [router.route() for _ in range(4)] == [0, 1, 2, 0]
    router.release(1)
    router.release(2)
    assert [router.route() for _ in range(3)] == [1, 2, 1]
    seeded = pjllm.SamplingParams(seed=7)
    assert router.seeded(seeded) is seeded
    unseeded = pjllm.SamplingParams()
    draws = np.random.default_rng(0).integers(2**31, size=2).tolist()
    assert [router.seeded(unseeded).seed, router.seeded(unseeded).seed] == draws
    assert unseeded.seed is None


def test_two_replicas_of_two_devices_match_transformers():
    with pjllm.LLM(str(GOLDEN / "llama2"), tensor_parallel_size=2, data_parallel_size=2,
                   **GOLDEN_OPTIONS) as llm:
        assert_matches_golden(llm, "llama2")
        replicas = llm.engine.replicas
        for replica, devices in zip(replicas, ({0, 1}, {2, 3})):
            runner = replica.model_runner
            assert _device_ids(runner.weights) == devices
            assert _device_ids(runner.kv_caches) == devices
            assert replica.step_timings.steps > 0  # the golden prompts went to both


def test_replicas_sample_what_one_engine_samples(two_replicas):
    """Seeded and unseeded sampling (unseeded requests draw the seeds one engine would), n > 1:
    token for token one engine's outputs, in input order, each with a finish reason."""
    rng = np.random.default_rng(5)
    prompts = [{"prompt_token_ids": rng.integers(3, 256, rng.integers(3, 12)).tolist()}
               for _ in range(6)]
    params = [pjllm.SamplingParams(temperature=1.0, max_tokens=8, seed=11 + i, ignore_eos=True)
              for i in range(3)]
    params += [pjllm.SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True),
               pjllm.SamplingParams(temperature=1.0, max_tokens=5, n=2, ignore_eos=True),
               pjllm.SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)]

    with pjllm.LLM(str(GOLDEN / "llama2"), **GOLDEN_OPTIONS) as one:
        expected = one.generate(prompts, params, use_tqdm=False)
    replicas = two_replicas.engine.replicas
    steps = [replica.step_timings.steps for replica in replicas]
    outputs = two_replicas.generate(prompts, params, use_tqdm=False)
    assert all(replica.step_timings.steps > before for replica, before in zip(replicas, steps))
    assert [o.prompt_token_ids for o in outputs] == [p["prompt_token_ids"] for p in prompts]
    assert all(o.finished and all(c.finish_reason == "length" for c in o.outputs) for o in outputs)
    assert ([[c.token_ids for c in o.outputs] for o in outputs]
            == [[c.token_ids for c in o.outputs] for o in expected])


def test_an_abort_reaches_the_replica_that_holds_the_request(two_replicas):
    engine = two_replicas.engine
    params = pjllm.SamplingParams(temperature=0.0, max_tokens=4, seed=0, ignore_eos=True)
    for index in range(3):
        engine.add_request(f"r{index}", {"prompt_token_ids": [5, 6, 7 + index]}, params)
    assert [len(replica.requests) for replica in engine.replicas] == [2, 1]
    assert engine.abort_request("r1").outputs[0].finish_reason == "abort"
    assert [len(replica.requests) for replica in engine.replicas] == [2, 0]
    engine.add_request("r3", {"prompt_token_ids": [9, 9]}, params)  # to the less busy one
    assert [len(replica.requests) for replica in engine.replicas] == [2, 1]
    finished = engine.run_to_completion()
    assert sorted(finished) == ["r0", "r2", "r3"] and not engine.has_unfinished_requests()
    for replica in engine.replicas:
        manager = replica.kv_cache_manager
        assert manager.num_free_pages == manager.num_pages


def test_more_devices_than_there_are_is_refused_naming_both_sizes():
    count = len(jax.devices())
    with pytest.raises(ValueError, match=rf"tensor_parallel_size \(2\) x data_parallel_size "
                                         rf"\({count}\) = {2 * count} devices, but only {count}"):
        pjllm.LLM(str(GOLDEN / "llama2"), tensor_parallel_size=2, data_parallel_size=count,
                  **GOLDEN_OPTIONS)
    with pytest.raises(ValueError, match="data_parallel_size must be an integer >= 1"):
        pjllm.LLM(str(GOLDEN / "llama2"), data_parallel_size=0, **GOLDEN_OPTIONS)
