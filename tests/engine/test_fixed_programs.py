"""The step programs are a fixed set built at startup: no request's sampling settings compile
anything at serving time, and a request's tokens do not depend on the rest of its batch."""

import os

import numpy as np

from pjllm import SamplingParams

# Every option that selects a sampler stage, each with its own seed. The tiny model's vocabulary
# is 256: top_k 200 (> SORT_FREE_TOP_K) and top_p alone make the batch sort it.
SETTINGS = [
    dict(temperature=0.0),
    dict(temperature=0.9),
    dict(temperature=0.8, top_k=5),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.7, top_k=200, top_p=0.95),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.8, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3),
    dict(temperature=0.0, min_tokens=6, stop_token_ids=[7, 9]),
    dict(temperature=1.0, logprobs=0),
    dict(temperature=0.6, logprobs=3),
    dict(temperature=0.0, logprobs=20),
    dict(temperature=1.0, prompt_logprobs=2),
    dict(temperature=0.0, prompt_logprobs=20, logprobs=1),
]


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _result(output):
    completion = output.outputs[0]
    logprobs = [sorted(entry) for entry in completion.logprobs or []]
    prompt = [sorted(entry) if entry else None for entry in output.prompt_logprobs or []]
    return completion.token_ids, logprobs, prompt


def test_no_program_is_built_after_the_warmup_whatever_the_settings(make_llm):
    llm = make_llm(warmup="blocking")
    programs = llm.engine.model_runner.programs
    built = len(programs)
    assert built == len(llm.engine.model_runner.program_keys())
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(3, 256, int(rng.integers(3, 40))).tolist()}
               for _ in SETTINGS]
    params = [SamplingParams(max_tokens=8, ignore_eos=True, seed=i, **settings)
              for i, settings in enumerate(SETTINGS)]
    alone = [_result(llm.generate(prompt, p, use_tqdm=False)[0]) for prompt, p in zip(prompts, params)]
    assert len(programs) == built

    memory = []
    for round_ in range(4):  # batches of different mixes, sizes and orders
        order = rng.permutation(len(SETTINGS))[:int(rng.integers(3, len(SETTINGS) + 1))]
        outputs = llm.generate([prompts[i] for i in order], [params[i] for i in order],
                               use_tqdm=False)
        for i, output in zip(order, outputs):
            assert _result(output) == alone[i], SETTINGS[i]
        memory.append(_resident_mib())
    assert len(programs) == built
    # Nothing new is compiled or cached: resident memory stays flat after the first batch.
    assert memory[-1] - memory[0] < 64, memory


def test_logprob_counts_are_sliced_per_request(make_llm):
    llm = make_llm()
    prompt = {"prompt_token_ids": [5, 6, 7, 8]}
    few, many = llm.generate([prompt, prompt], [
        SamplingParams(temperature=0.0, max_tokens=3, logprobs=2, prompt_logprobs=1),
        SamplingParams(temperature=0.0, max_tokens=3, logprobs=20, prompt_logprobs=20)],
        use_tqdm=False)
    assert all(len(entry) in (2, 3) for entry in few.outputs[0].logprobs)
    assert all(len(entry) in (20, 21) for entry in many.outputs[0].logprobs)
    assert all(len(entry) in (1, 2) for entry in few.prompt_logprobs[1:])

    def top_two(entry):
        return {token: (lp.rank, lp.logprob) for token, lp in entry.items() if lp.rank <= 2}

    for small, large in zip(few.outputs[0].logprobs, many.outputs[0].logprobs):
        assert top_two(small) == top_two(large)
