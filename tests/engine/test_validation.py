"""Bad input is refused at the edge with a ValueError naming the field; nothing else escapes.

The fuzz tests feed SamplingParams and prompts of every shape: each input either runs to a
finished output or raises ValueError, never anything else, and leaves the engine clean."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pjllm
from pjllm import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
VOCAB = 256  # the tiny model's (tests/engine/conftest.py)


@pytest.mark.parametrize("params, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=10**400), "temperature"),
    (dict(temperature=1e39), "temperature"),  # finite in Python, inf in the device's float32
    (dict(repetition_penalty=1e-46), "repetition_penalty"),  # 0 in float32
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("inf")), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(n=True), "n"),
    (dict(n=0), "n"),
    (dict(seed="1"), "seed"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(stop=5), "stop"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
    (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_sampling_params_name_the_field(params, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**params)


def test_numpy_numbers_are_accepted_as_plain_ones():
    params = SamplingParams(n=np.int64(2), temperature=np.float32(0.5), top_k=np.int32(5),
                            stop_token_ids=[np.int64(3)])
    assert (type(params.n), type(params.temperature), type(params.stop_token_ids[0])) == (int, float, int)


@pytest.fixture(scope="module")
def llm(tiny_model_path_module):
    llm = pjllm.LLM(tiny_model_path_module, load_format="dummy", dtype="float32", max_model_len=64,
                    page_size=8, max_num_seqs=4, max_num_batched_tokens=32, seed=0,
                    compilation_cache_dir=None)
    yield llm
    _assert_clean(llm.engine)


def _assert_clean(engine):
    assert not engine.has_unfinished_requests() and engine.requests == {}
    assert engine.kv_cache_manager.num_free_pages == engine.kv_cache_manager.num_pages


@pytest.mark.parametrize("prompts, message", [
    (123, "prompts must be"),
    (None, "prompts must be"),
    ([1.5, 2.7], "prompt_token_ids must be a flat list of integer"),
    ({"prompt_token_ids": [1.5, 2.7]}, "prompt_token_ids must be a flat list of integer"),
    ({"prompt_token_ids": [True, 3]}, "prompt_token_ids must be a flat list of integer"),
    ({"prompt_token_ids": [[1, 2]]}, "prompt_token_ids must be a flat list of integer"),
    ({"prompt_token_ids": "hello"}, "prompt_token_ids must be a flat list"),
    ({"prompt_token_ids": 5}, "prompt_token_ids must be a flat list"),
    ({"prompt": [5, 6, 7]}, "prompt must be a string"),
    (np.array(5), "prompts must be"),
    ([-1, 3], r"prompt_token_ids must be in \[0, 256\)"),
    ([3, VOCAB], r"prompt_token_ids must be in \[0, 256\)"),
    ({"prompt_token_ids": []}, "prompt_token_ids must not be empty"),
    ({"prompt_token_ids": [5] * 64}, "max_model_len"),
    ({"text": "hi"}, "a prompt dict takes"),
    ("hello", "no tokenizer"),
    ([[1, 2], 7], "prompt must be a string"),
])
def test_bad_prompts_name_the_field(llm, prompts, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    _assert_clean(llm.engine)


@pytest.mark.parametrize("params, message", [
    (SamplingParams(stop_token_ids=[VOCAB]), r"SamplingParams.stop_token_ids must be in \[0, 256\)"),
    (SamplingParams(stop_token_ids=[2**31], min_tokens=1), "SamplingParams.stop_token_ids"),
    (SamplingParams(n=10**9), r"SamplingParams.n must be <= max_num_seqs \(4\)"),
    (SamplingParams(logprobs=21), r"SamplingParams.logprobs must be <= max_logprobs \(20\); got 21"),
    (SamplingParams(prompt_logprobs=50),
     r"SamplingParams.prompt_logprobs must be <= max_logprobs \(20\); got 50"),
    (SamplingParams(min_tokens=1, stop_token_ids=list(range(40))),
     r"SamplingParams.stop_token_ids: with min_tokens > 0, at most 32"),
    ("greedy", "sampling_params must be a SamplingParams"),
    ([GREEDY, GREEDY], "sampling_params has 2 entries for 1 prompts"),
])
def test_bad_sampling_for_this_model_names_the_limit(llm, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([[5, 6]], params, use_tqdm=False)
    _assert_clean(llm.engine)


def test_logprobs_beyond_a_small_vocabulary_are_refused(tmp_path, tiny_model_path_module):
    import json
    config = json.loads(open(tiny_model_path_module).read())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**config, "vocab_size": 16}))
    small = pjllm.LLM(str(path), load_format="dummy", dtype="float32", max_model_len=32, page_size=8,
                      max_num_seqs=2, compilation_cache_dir=None)
    with pytest.raises(ValueError, match=r"SamplingParams.logprobs must be <= the vocabulary size \(16\)"):
        small.generate([[1, 2]], SamplingParams(logprobs=20), use_tqdm=False)
    small.shutdown()


def test_edge_values_that_are_valid_run(llm):
    assert llm.generate([], GREEDY) == []
    ids = np.array([5, 6, 7], np.int64)
    (out,) = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)
    assert out.prompt_token_ids == [5, 6, 7] and len(out.outputs[0].token_ids) == 4
    # top_k at or above the vocabulary is off (as in vLLM): the same tokens as no top_k.
    sampled = dict(temperature=1.0, seed=3, max_tokens=5, ignore_eos=True)
    huge_k = llm.generate([[5, 6]], SamplingParams(top_k=2**31, **sampled), use_tqdm=False)
    no_k = llm.generate([[5, 6]], SamplingParams(**sampled), use_tqdm=False)
    assert huge_k[0].outputs[0].token_ids == no_k[0].outputs[0].token_ids


def test_bad_engine_options_name_the_field(tiny_model_path_module, tmp_path):
    options = dict(load_format="dummy", compilation_cache_dir=None)
    with pytest.raises(ValueError, match="model"):
        pjllm.LLM(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="dtype"):
        pjllm.LLM(tiny_model_path_module, dtype="int3", **options)
    with pytest.raises(ValueError, match="attention_backend"):
        pjllm.LLM(tiny_model_path_module, attention_backend="cuda", **options)
    with pytest.raises(ValueError, match="unknown engine argument"):
        pjllm.LLM(tiny_model_path_module, max_num_sequences=4, **options)
    for field, value in (("max_model_len", 100.5), ("max_model_len", True), ("max_num_seqs", 2.5),
                         ("num_pages", 0), ("page_size", 12), ("gpu_memory_utilization", "all"),
                         ("seed", None), ("async_scheduling", 1), ("max_logprobs", -1)):
        with pytest.raises(ValueError, match=rf"^{field} must be"):
            pjllm.LLM(tiny_model_path_module, **{field: value}, **options)


def test_max_model_len_beyond_the_model_is_refused(tiny_model_path_module):
    with pytest.raises(ValueError, match=r"max_model_len \(1000\) must be <= the model's context length \(256"):
        pjllm.LLM(tiny_model_path_module, load_format="dummy", max_model_len=1000,
                  compilation_cache_dir=None)


# ---------------------------------------------------------------- fuzzing
_ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(-2**70, 2**70),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
                 st.lists(st.integers(-5, 300), max_size=3), st.lists(st.text(max_size=2), max_size=2))
_FIELDS = ["n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "seed", "stop", "stop_token_ids", "include_stop_str_in_output",
           "ignore_eos", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
           "skip_special_tokens"]
_SENSIBLE = {
    "n": st.integers(1, 3), "temperature": st.sampled_from([0.0, 0.7, 1.3]),
    "top_p": st.floats(0.05, 1.0), "top_k": st.sampled_from([-1, 0, 1, 5, 255, 256, 2**40]),
    "min_p": st.floats(0.0, 1.0), "presence_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2.0), "seed": st.integers(-2**40, 2**70),
    "stop_token_ids": st.lists(st.integers(0, VOCAB + 5), max_size=3),
    "max_tokens": st.integers(1, 6), "min_tokens": st.integers(0, 8),
    "logprobs": st.integers(0, 21), "prompt_logprobs": st.integers(0, 3), "ignore_eos": st.booleans(),
}


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _ANY, max_size=4))
def test_sampling_params_either_build_or_raise_value_error(kwargs):
    try:
        params = SamplingParams(**kwargs)
    except ValueError:
        return
    for field in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty"):
        assert isinstance(getattr(params, field), float) and math.isfinite(getattr(params, field))


_PROMPTS = st.one_of(
    st.lists(st.integers(-2, VOCAB + 2), max_size=70),
    st.lists(st.one_of(st.integers(0, 20), st.floats(0, 20), st.booleans(), st.none()), max_size=4),
    st.fixed_dictionaries({"prompt_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=8)}),
    st.text(max_size=4), st.none(), st.integers(),
)


@settings(max_examples=25, deadline=None)
@given(prompt=_PROMPTS, kwargs=st.fixed_dictionaries({}, optional=_SENSIBLE))
def test_any_request_runs_or_raises_value_error(llm, prompt, kwargs):
    """Through the whole engine: a ValueError at the edge, or a finished output."""
    try:
        params = SamplingParams(**kwargs)
        outputs = llm.generate(prompt, params, use_tqdm=False)
    except ValueError:
        _assert_clean(llm.engine)
        return
    assert all(out.finished for out in outputs)
    for out in outputs:
        for completion in out.outputs:
            assert completion.finish_reason in ("stop", "length"), completion.finish_reason
            assert all(0 <= t < VOCAB for t in completion.token_ids)
            if completion.logprobs is not None:
                for token, entry in zip(completion.token_ids, completion.logprobs):
                    assert entry[token].rank >= 1
    _assert_clean(llm.engine)
