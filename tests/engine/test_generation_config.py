"""A model's generation_config.json supplies the default sampling parameters, the same way for
`LLM` (no SamplingParams given) and for the server (fields a request leaves out)."""

import json

import pjllm
from pjllm import SamplingParams
from pjllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

from tests.engine.conftest import TINY_CONFIG

GENERATION = {"temperature": 0.0, "top_k": 7, "top_p": 0.9, "max_new_tokens": 5, "do_sample": True}
OPTIONS = dict(load_format="dummy", dtype="float32", max_model_len=128, page_size=8, max_num_seqs=4,
               max_num_batched_tokens=32, compilation_cache_dir=None)


def _model_dir(tmp_path, generation=GENERATION):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return str(tmp_path)


def test_llm_generate_without_params_uses_the_models_defaults(tmp_path):
    with pjllm.LLM(_model_dir(tmp_path), **OPTIONS) as llm:
        defaults = llm.engine.default_sampling_params()
        assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.max_tokens) == (0.0, 7, 0.9, 5)
        prompt = {"prompt_token_ids": [5, 6, 7, 8]}
        [by_default] = llm.generate(prompt, use_tqdm=False)
        [explicit] = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)
        assert by_default.outputs[0].token_ids == explicit.outputs[0].token_ids
        assert 1 <= len(by_default.outputs[0].token_ids) <= 5


def test_generation_config_none_keeps_pjllms_defaults(tmp_path):
    with pjllm.LLM(_model_dir(tmp_path), generation_config="none", **OPTIONS) as llm:
        assert llm.engine.default_sampling_params() == SamplingParams()


def test_request_fields_override_the_defaults_and_omitted_ones_take_them():
    defaults = {"temperature": 0.3, "top_k": 7, "repetition_penalty": 1.1, "max_tokens": 5}
    omitted = CompletionRequest(prompt="x")
    params = omitted.sampling_params(defaults, omitted.max_tokens, None)
    assert (params.temperature, params.top_k, params.repetition_penalty) == (0.3, 7, 1.1)
    assert params.max_tokens == 16  # completions' own default, as OpenAI's
    given = CompletionRequest(prompt="x", temperature=1.0, top_k=-1)
    params = given.sampling_params(defaults, given.max_tokens, None)
    assert (params.temperature, params.top_k) == (1.0, 0)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    assert chat.sampling_params(defaults, None, None).max_tokens == 5
