"""Checking an engine against a tiny model's transformers goldens (tests/golden/NAME)."""

import json
import pathlib

import numpy as np

import pjllm

GOLDEN = pathlib.Path(__file__).parent / "golden"


def assert_matches_golden(llm: pjllm.LLM, name: str) -> None:
    """`llm` gives golden NAME's prompt logprobs (within 1e-4) and 16-token greedy continuations."""
    prompts = json.loads((GOLDEN / name / "expected.json").read_text())["prompts"]
    inputs = [{"prompt_token_ids": p["prompt_ids"]} for p in prompts]
    params = pjllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, ignore_eos=True)
    for prompt, output in zip(prompts, llm.generate(inputs, params, use_tqdm=False)):
        ids = prompt["prompt_ids"]
        ours = [output.prompt_logprobs[i + 1][ids[i + 1]].logprob for i in range(len(ids) - 1)]
        np.testing.assert_allclose(ours, prompt["prompt_logprobs"], atol=1e-4, rtol=0)
    greedy = pjllm.SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate(inputs, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [p["greedy_ids"] for p in prompts]
