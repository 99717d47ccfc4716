"""Scheduler and page allocator, without a device: invariants under random workloads."""

from hypothesis import given, settings
from hypothesis import strategies as st

from pjllm.engine.kv_cache_manager import KVCacheManager, pages_needed
from pjllm.engine.scheduler import Scheduler
from pjllm.engine.sequence import Request, Sequence
from pjllm.sampling_params import SamplingParams


def _make_seq(seq_id: int, prompt_len: int, max_tokens: int) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens)
    request = Request(str(seq_id), None, list(range(prompt_len)), params, ())
    seq = Sequence(seq_id, request, 0, 0, list(range(prompt_len)), prompt_len, prompt_len + max_tokens)
    request.seqs.append(seq)
    return seq


def _run(scheduler: Scheduler, seqs: list[Sequence], arrivals: list[int], max_steps: int):
    """Simulates the engine loop; returns (steps taken, number of preemptions)."""
    kv = scheduler.kv_cache_manager
    pending = sorted(zip(arrivals, range(len(seqs))))
    step = preemptions = 0
    while pending or scheduler.has_unfinished():
        while pending and pending[0][0] <= step:
            scheduler.add(seqs[pending.pop(0)[1]])
        out = scheduler.schedule()
        preemptions += len(out.preempted)
        assert out.num_tokens <= scheduler.max_num_batched_tokens
        assert len(out.scheduled) <= scheduler.max_num_seqs
        assert len({id(s.seq) for s in out.scheduled}) == len(out.scheduled)
        for item in out.scheduled:
            seq = item.seq
            assert len(seq.block_table) >= pages_needed(seq.num_computed_tokens + item.num_new_tokens,
                                                        kv.page_size)
            samples = item.samples
            seq.num_computed_tokens += item.num_new_tokens
            if samples:
                seq.token_ids.append(7)
                if seq.num_output_tokens >= seq.params.max_tokens:
                    scheduler.finish(seq, "length")
        kv.check_invariants(scheduler.running + list(scheduler.waiting))
        step += 1
        assert step < max_steps, "no progress: the scheduler deadlocked"
    return step, preemptions


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=12),
    arrivals=st.lists(st.integers(0, 10), min_size=12, max_size=12),
    page_size=st.sampled_from([4, 8, 16]),
    extra_pages=st.integers(0, 30),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(1, 64),
)
def test_random_workloads_finish_without_leaks(lengths, arrivals, page_size, extra_pages, max_num_seqs,
                                               budget):
    longest = max(p + m for p, m in lengths)
    num_pages = pages_needed(longest, page_size) + extra_pages
    kv = KVCacheManager(num_pages, page_size)
    scheduler = Scheduler(kv, max_num_seqs, budget)
    seqs = [_make_seq(i, p, m) for i, (p, m) in enumerate(lengths)]
    _run(scheduler, seqs, arrivals[:len(seqs)], max_steps=20_000)
    assert all(seq.is_finished and seq.finish_reason == "length" for seq in seqs)
    assert all(seq.num_output_tokens == seq.params.max_tokens for seq in seqs)
    assert kv.num_free_pages == num_pages


def test_preemption_under_tiny_page_budget():
    kv = KVCacheManager(num_pages=6, page_size=4)  # 24 tokens for four 10+10-token sequences
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    seqs = [_make_seq(i, 10, 10) for i in range(4)]
    _, preemptions = _run(scheduler, seqs, [0, 0, 0, 0], max_steps=1000)
    assert preemptions > 0
    assert all(seq.num_output_tokens == 10 for seq in seqs)
    assert kv.num_free_pages == 6


def test_new_request_joins_running_batch_next_step():
    kv = KVCacheManager(num_pages=64, page_size=8)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    first, second = _make_seq(0, 5, 10), _make_seq(1, 5, 10)
    scheduler.add(first)
    out = scheduler.schedule()
    assert [s.seq for s in out.scheduled] == [first]
    first.num_computed_tokens += 5
    first.token_ids.append(1)
    scheduler.add(second)
    out = scheduler.schedule()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(first, 1), (second, 5)]


def test_prefill_is_chunked_to_the_token_budget():
    kv = KVCacheManager(num_pages=64, page_size=8)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=16)
    seq = _make_seq(0, 40, 4)
    scheduler.add(seq)
    chunks = []
    while not seq.is_prefill_done:
        (item,) = scheduler.schedule().scheduled
        chunks.append((item.num_new_tokens, item.samples))
        seq.num_computed_tokens += item.num_new_tokens
    assert chunks == [(16, False), (16, False), (8, True)]


def test_finish_frees_pages_at_once():
    kv = KVCacheManager(num_pages=8, page_size=4)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    seq = _make_seq(0, 9, 4)
    scheduler.add(seq)
    scheduler.schedule()
    assert kv.num_free_pages == 5
    scheduler.finish(seq, "abort")
    assert kv.num_free_pages == 8 and not scheduler.has_unfinished()
