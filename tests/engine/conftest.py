"""Engine fixtures: a tiny random-weight Llama, and a leak check after every engine test."""

import json

import pytest

import pjllm

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 256, "eos_token_id": 2, "bos_token_id": 1,
}


@pytest.fixture
def tiny_model_path(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


@pytest.fixture(scope="module")
def tiny_model_path_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


@pytest.fixture
def make_llm(tiny_model_path):
    """Builds LLMs on the tiny random model; afterwards checks that every page is free again."""
    llms = []

    def make(**kwargs):
        options = dict(load_format="dummy", dtype="float32", max_model_len=128, page_size=8,
                       max_num_seqs=8, max_num_batched_tokens=64, seed=0, compilation_cache_dir=None)
        options.update(kwargs)
        llm = pjllm.LLM(tiny_model_path, **options)
        llms.append(llm)
        return llm

    yield make
    for llm in llms:
        engine = llm.engine
        assert not engine.has_unfinished_requests()
        assert engine.kv_cache_manager.num_free_pages == engine.kv_cache_manager.num_pages, "pages leaked"
