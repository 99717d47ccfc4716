"""The synthetic workloads: sizes, length distributions, clipping, token ranges, reproducibility."""

import numpy as np
import pytest

from pjllm.bench import datasets
from pjllm.bench.datasets import make_workload, special_token_ids

VOCAB = 32000


def _lens(workload):
    return (np.array([r.prompt_len for r in workload.requests]),
            np.array([r.output_len for r in workload.requests]))


def test_chat_sizes_and_lognormal_lengths():
    workload = make_workload("chat", VOCAB, seed=0)
    prompt, output = _lens(workload)
    assert len(workload.requests) == 1000
    # Median of 1000 lognormal draws (sigma 0.9) is within a few percent of the target.
    assert np.median(prompt) == pytest.approx(200, rel=0.12)
    assert np.median(output) == pytest.approx(180, rel=0.12)
    # sigma 0.9: the spread in log space is about 0.9 (before clipping, which is rare).
    assert np.std(np.log(prompt)) == pytest.approx(0.9, rel=0.15)
    assert prompt.min() >= 4 and output.min() >= 4
    assert prompt.max() <= 1024 and output.max() <= 1024


def test_chat_lengths_are_clipped():
    rng = np.random.default_rng(0)
    lengths = datasets.lognormal_lengths(rng, 20000, median=200, sigma=3.0, low=4, high=1024)
    assert lengths.min() == 4 and lengths.max() == 1024


@pytest.mark.parametrize("name, count, prompt_len, output_len", [
    ("decode", 256, 128, 1024), ("prefill", 512, 1024, 128)])
def test_fixed_datasets(name, count, prompt_len, output_len):
    workload = make_workload(name, VOCAB, seed=1)
    prompt, output = _lens(workload)
    assert len(workload.requests) == count
    assert set(prompt) == {prompt_len} and set(output) == {output_len}
    assert workload.max_total_len == prompt_len + output_len


def test_random_dataset_and_num_prompts_override():
    workload = make_workload("random", VOCAB, seed=0, num_prompts=7, input_len=33, output_len=5)
    prompt, output = _lens(workload)
    assert len(workload.requests) == 7 and set(prompt) == {33} and set(output) == {5}
    assert len(make_workload("chat", VOCAB, num_prompts=12).requests) == 12
    assert len(make_workload("decode", VOCAB, num_prompts=3).requests) == 3


def test_seed_reproducibility():
    a = make_workload("chat", VOCAB, seed=3, num_prompts=50)
    b = make_workload("chat", VOCAB, seed=3, num_prompts=50)
    c = make_workload("chat", VOCAB, seed=4, num_prompts=50)
    assert a.requests == b.requests and a.digest() == b.digest()
    assert a.digest() != c.digest()


def test_token_ids_in_vocab_and_avoid_special_ids():
    vocab = 64
    special = special_token_ids({"bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 0})
    assert special == {0, 1, 2, 3}
    workload = make_workload("random", vocab, seed=0, num_prompts=20, input_len=200, output_len=1,
                             exclude_ids=special)
    ids = np.concatenate([r.prompt_token_ids for r in workload.requests])
    assert ids.min() >= 4 and ids.max() < vocab
    assert len(np.unique(ids)) == vocab - 4  # the whole allowed range is used


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="dataset must be one of"):
        make_workload("sharegpt", VOCAB)
    with pytest.raises(ValueError, match="random"):
        make_workload("chat", VOCAB, input_len=10)
    with pytest.raises(ValueError, match="num_prompts"):
        make_workload("random", VOCAB, num_prompts=0)


def test_head_caps_outputs_for_warmup():
    workload = make_workload("decode", VOCAB, num_prompts=10)
    head = workload.head(3, max_output_len=16)
    assert len(head) == 3 and all(r.output_len == 16 for r in head)
    assert head[0].prompt_token_ids == workload.requests[0].prompt_token_ids
