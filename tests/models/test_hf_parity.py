"""Parity with HF transformers through the public API, on tiny random checkpoints (tests/golden/).

The goldens are made by scripts/make_goldens.py (Python 3.11, torch CPU, transformers) in float32.
"""

import json
import pathlib

import numpy as np
import pytest

import pjllm

GOLDEN = pathlib.Path(__file__).parent.parent / "golden"
# mistral_window: a sliding window of 8 tokens, shorter than two of the prompts.
MODELS = ["llama2", "llama3", "llama_yarn", "mistral", "mistral_window", "qwen2", "qwen3", "llama_tied_mqa",
          "llama_hd80", "gpt2", "gpt_neox", "gpt_neox_sequential", "gemma3", "bloom",
          "falcon_mqa", "falcon_new", "falcon_sequential", "falcon_alibi"]
# float32 through either attention path: within 1e-4 of transformers' float32 (on CPU, and on the
# GPU, where float32 must not mean TF32). The Pallas kernels run in interpret mode on CPU.
ATOL = 1e-4


@pytest.fixture(scope="module", params=[(model, backend) for model in MODELS
                                        for backend in ("reference", "pallas")],
                ids=lambda param: "-".join(param))
def golden(request):
    model, backend = request.param
    path = GOLDEN / model
    expected = json.loads((path / "expected.json").read_text())
    llm = pjllm.LLM(str(path), dtype="float32", max_model_len=128, page_size=8, max_num_seqs=4,
                    max_num_batched_tokens=32, compilation_cache_dir=None,
                    skip_tokenizer_init=True, attention_backend=backend)
    yield llm, expected["prompts"]
    llm.shutdown()


def test_prompt_logprobs_match_transformers(golden):
    llm, prompts = golden
    params = pjllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p["prompt_ids"]} for p in prompts], params,
                           use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        ids = prompt["prompt_ids"]
        ours = [output.prompt_logprobs[i + 1][ids[i + 1]].logprob for i in range(len(ids) - 1)]
        np.testing.assert_allclose(ours, prompt["prompt_logprobs"], atol=ATOL, rtol=0)
        for i in range(len(ids) - 1):
            entry = output.prompt_logprobs[i + 1]
            top = sorted((lp.rank, t) for t, lp in entry.items() if lp.rank is not None and lp.rank <= 5)
            assert [t for _, t in top] == prompt["top5_ids"][i]
            np.testing.assert_allclose([entry[t].logprob for _, t in top], prompt["top5_logprobs"][i],
                                       atol=ATOL, rtol=0)


def test_greedy_continuations_match_transformers(golden):
    llm, prompts = golden
    params = pjllm.SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p["prompt_ids"]} for p in prompts], params,
                           use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == prompt["greedy_ids"]
    kv = llm.engine.kv_cache_manager
    assert kv.num_free_pages == kv.num_pages


BEAM_GOLDEN = json.loads((GOLDEN / "beam_search.json").read_text())


@pytest.mark.parametrize("model", sorted(BEAM_GOLDEN["models"]))
def test_beam_search_matches_transformers(model):
    """`LLM.beam_search` (ignore_eos) returns transformers' beams in its order, with its scores
    (summed output logprobs over output length ** length_penalty)."""
    with pjllm.LLM(str(GOLDEN / model), dtype="float32", max_model_len=128, page_size=8,
                   max_num_seqs=16, max_num_batched_tokens=128, compilation_cache_dir=None,
                   skip_tokenizer_init=True) as llm:
        for case in BEAM_GOLDEN["models"][model]:
            params = pjllm.BeamSearchParams(beam_width=case["beam_width"],
                                            max_tokens=case["max_tokens"], ignore_eos=True,
                                            length_penalty=case["length_penalty"])
            [output] = llm.beam_search([{"prompt_token_ids": case["prompt_ids"]}], params)
            assert [beam.output_token_ids for beam in output.sequences] == case["output_ids"]
            np.testing.assert_allclose([beam.score(params.length_penalty) for beam in output.sequences],
                                       case["scores"], atol=ATOL, rtol=0)
            assert all(beam.tokens[:len(case["prompt_ids"])] == case["prompt_ids"]
                       and beam.finish_reason == "length" for beam in output.sequences)
        kv = llm.engine.kv_cache_manager
        assert kv.num_hit_tokens > 0  # the beams' steps read their prefixes from the cache
