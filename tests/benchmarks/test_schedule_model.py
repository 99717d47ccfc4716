"""benchmarks/schedule_model.py: the replay schedules what the engine would."""

import numpy as np

from benchmarks.schedule_model import replay
from pjllm.bench.datasets import BenchRequest


def test_distinct_prompts_are_prefilled_in_full_and_shared_ones_hit_the_prefix_cache():
    rng = np.random.default_rng(0)
    distinct = [BenchRequest(rng.integers(0, 1000, 64).tolist(), 3) for _ in range(4)]
    steps = replay(distinct, max_num_seqs=8, budget=512, num_pages=64, page_size=16)
    # every prompt token once, then one token per later output token (the first comes from prefill)
    assert steps[:, 0].sum() == 4 * 64 + 4 * 2

    shared = [BenchRequest([7] * 64, 3) for _ in range(4)]
    hits = replay(shared, max_num_seqs=8, budget=512, num_pages=64, page_size=16)
    assert hits[:, 0].sum() < steps[:, 0].sum()
