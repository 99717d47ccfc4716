"""Scheduler and page allocator, without a device: invariants under random workloads, and the
message the runner gets (a diff over the batch it holds)."""

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st

from pjllm.engine.kv_cache_manager import KVCacheManager, pages_needed
from pjllm.engine.scheduler import Scheduler
from pjllm.engine.sequence import Request, Sequence
from pjllm.sampling_params import SamplingParams


def _make_seq(seq_id: int, prompt_len: int, max_tokens: int,
              prefix: list[int] | None = None) -> Sequence:
    """A sequence whose prompt is `prefix` (shared with others) then tokens of its own."""
    prefix = (prefix or [])[:prompt_len]
    prompt = prefix + [1000 * (seq_id + 1) + i for i in range(prompt_len - len(prefix))]
    params = SamplingParams(max_tokens=max_tokens)
    request = Request(str(seq_id), None, prompt, params, ())
    seq = Sequence(seq_id, request, 0, 0, list(prompt), prompt_len, prompt_len + max_tokens)
    request.seqs.append(seq)
    return seq


def _apply(runner_pages: dict[int, list[int]], message) -> None:
    """What the runner keeps of the messages: the pages of each sequence it holds."""
    if message.reset_batch:
        runner_pages.clear()
    for seq_id in message.removed_seq_ids:
        del runner_pages[seq_id]
    for new in message.new_seqs:
        assert new.seq_id not in runner_pages
        runner_pages[new.seq_id] = list(new.page_ids)
    for seq_id, pages in message.new_page_ids.items():
        runner_pages[seq_id] += pages


def _run(scheduler: Scheduler, seqs: list[Sequence], arrivals: list[int], max_steps: int,
         aborts: dict[int, int] | None = None):
    """Simulates the engine loop, with a runner that keeps only pages; `aborts` maps a
    sequence's index to the step at which it is aborted. Returns (steps taken, number of
    preemptions)."""
    kv = scheduler.kv_cache_manager
    pending = sorted(zip(arrivals, range(len(seqs))))
    step = preemptions = 0
    runner_pages: dict[int, list[int]] = {}
    while pending or scheduler.has_unfinished():
        while pending and pending[0][0] <= step:
            scheduler.add(seqs[pending.pop(0)[1]])
        for index, abort_step in (aborts or {}).items():
            if abort_step == step and seqs[index] in scheduler.running + list(scheduler.waiting):
                scheduler.finish(seqs[index], "abort")
        out = scheduler.schedule()
        if out.scheduled:  # only then does the engine hand the message on
            message = out.message
            _apply(runner_pages, message)
            assert message.scheduled_seq_ids == [item.seq.seq_id for item in out.scheduled]
            assert message.num_scheduled_tokens == [item.num_new_tokens for item in out.scheduled]
            assert all(runner_pages[item.seq.seq_id] == kv.block_table(item.seq)
                       for item in out.scheduled)
            assert set(runner_pages) <= {seq.seq_id for seq in scheduler.running}
            for new in message.new_seqs:
                seq = next(s for s in seqs if s.seq_id == new.seq_id)
                # It starts after its cached prefix: whole pages, and never all of its tokens.
                assert (new.token_ids, new.num_computed_tokens) == (seq.token_ids,
                                                                    seq.num_computed_tokens)
                assert new.num_computed_tokens % kv.page_size == 0
                assert new.num_computed_tokens < len(seq.token_ids)
                if not kv.enable_prefix_caching:
                    assert new.num_computed_tokens == 0
        preemptions += len(out.preempted)
        assert out.num_tokens <= scheduler.max_num_batched_tokens
        assert len(out.scheduled) <= scheduler.max_num_seqs
        assert len({id(s.seq) for s in out.scheduled}) == len(out.scheduled)
        for item in out.scheduled:
            seq = item.seq
            assert len(kv.block_table(seq)) >= pages_needed(seq.num_computed_tokens + item.num_new_tokens,
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
    prefix_groups=st.lists(st.integers(0, 2), min_size=12, max_size=12),
    aborts=st.dictionaries(st.integers(0, 11), st.integers(0, 40), max_size=4),
    caching=st.booleans(),
    priorities=st.one_of(st.none(), st.lists(st.integers(-2, 2), min_size=12, max_size=12)),
)
def test_random_workloads_finish_without_leaks(lengths, arrivals, page_size, extra_pages, max_num_seqs,
                                               budget, prefix_groups, aborts, caching, priorities):
    """Random request streams, many sharing prompt prefixes, random aborts, page budgets down to
    one sequence's worth, first come first served or by random priorities: every sequence ends, nothing leaks or is freed twice (the pool's
    invariants hold after every step), and every page is free at the end."""
    longest = max(p + m for p, m in lengths)
    num_pages = pages_needed(longest, page_size) + extra_pages
    kv = KVCacheManager(num_pages, page_size, enable_prefix_caching=caching)
    scheduler = Scheduler(kv, max_num_seqs, budget, "fcfs" if priorities is None else "priority")
    prefixes = [[], list(range(100, 140)), list(range(200, 230))]
    seqs = [_make_seq(i, p, m, prefixes[group])
            for i, ((p, m), group) in enumerate(zip(lengths, prefix_groups))]
    for seq, priority in zip(seqs, priorities or []):
        seq.request.priority = priority
    aborts = {index: step for index, step in aborts.items() if index < len(seqs)}
    _run(scheduler, seqs, arrivals[:len(seqs)], max_steps=20_000, aborts=aborts)
    for index, seq in enumerate(seqs):
        assert seq.is_finished
        if seq.finish_reason == "length":
            assert seq.num_output_tokens == seq.params.max_tokens
        else:
            assert (seq.finish_reason, index in aborts) == ("abort", True)
    assert kv.num_free_pages == num_pages and not any(kv.ref_counts)


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


def _messages_of(scheduler: Scheduler, seq: Sequence, steps: int) -> list:
    """Runs `steps` steps of `seq` alone (one token sampled per chunk that reaches the end)."""
    messages = []
    for _ in range(steps):
        out = scheduler.schedule()
        messages.append(out.message)
        for item in out.scheduled:
            samples = item.samples
            item.seq.num_computed_tokens += item.num_new_tokens
            if samples:
                item.seq.token_ids.append(7)
    return messages


def test_a_sequence_is_sent_once_then_only_counts_and_new_pages():
    kv = KVCacheManager(num_pages=16, page_size=4)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    seq = _make_seq(3, 6, 20)
    scheduler.add(seq)
    first, *later = _messages_of(scheduler, seq, 5)
    (new,) = first.new_seqs
    assert (new.seq_id, new.token_ids, new.num_prompt_tokens, new.page_ids) == (3, seq.token_ids[:6], 6,
                                                                                 [0, 1])
    assert new.params is seq.params and new.num_computed_tokens == 0
    assert (first.scheduled_seq_ids, first.num_scheduled_tokens) == ([3], [6])
    assert first.removed_seq_ids == [] and first.new_page_ids == {} and not first.reset_batch
    # Decodes at positions 6..9: position 8 is the first on a third page.
    for position, message in zip(range(6, 10), later):
        assert message.new_seqs == [] and message.removed_seq_ids == []
        assert (message.scheduled_seq_ids, message.num_scheduled_tokens) == ([3], [1])
        assert message.new_page_ids == ({3: [2]} if position == 8 else {})
    assert pickle.loads(pickle.dumps(first)) == first


def test_finished_and_preempted_sequences_are_removed_once():
    kv = KVCacheManager(num_pages=16, page_size=4)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    done, aborted, preempted, other = (_make_seq(i, 5, 20) for i in range(4))
    for seq in (done, aborted, preempted, other):
        scheduler.add(seq)
    _messages_of(scheduler, done, 2)
    scheduler.finish(done, "stop")
    scheduler.finish(aborted, "abort")
    scheduler.preempt(preempted)
    scheduler.finish(done, "stop")  # again: nothing more to remove
    message = scheduler.schedule().message
    # Removals come before additions: the preempted sequence is back, recomputed from scratch.
    assert sorted(message.removed_seq_ids) == [0, 1, 2]
    assert [new.seq_id for new in message.new_seqs] == [2]
    assert message.new_seqs[0].token_ids == preempted.token_ids
    assert message.scheduled_seq_ids == [3, 2]
    assert scheduler.schedule().message.removed_seq_ids == []


def test_a_waiting_sequence_that_finishes_was_never_sent():
    kv = KVCacheManager(num_pages=16, page_size=4)
    scheduler = Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=64)
    running, queued = _make_seq(0, 5, 20), _make_seq(1, 5, 20)
    scheduler.add(running)
    scheduler.add(queued)
    scheduler.schedule()
    scheduler.finish(queued, "abort")
    assert scheduler.schedule().message.removed_seq_ids == []


def test_removals_wait_for_a_message_that_reaches_the_runner():
    kv = KVCacheManager(num_pages=16, page_size=4)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    seq = _make_seq(0, 5, 20)
    scheduler.add(seq)
    _messages_of(scheduler, seq, 1)
    scheduler.finish(seq, "abort")
    idle = scheduler.schedule()
    assert idle.scheduled == []  # the engine dispatches nothing, so the runner never sees it
    later = _make_seq(1, 5, 20)
    scheduler.add(later)
    assert scheduler.schedule().message.removed_seq_ids == [0]


def test_a_reset_sends_every_sequence_again():
    kv = KVCacheManager(num_pages=16, page_size=4)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    seqs = [_make_seq(i, 5, 20) for i in range(2)]
    for seq in seqs:
        scheduler.add(seq)
    _messages_of(scheduler, seqs[0], 2)
    scheduler.finish(seqs[1], "abort")
    scheduler.reset_runner_batch()
    message = scheduler.schedule().message
    assert message.reset_batch and message.removed_seq_ids == []
    (new,) = message.new_seqs
    assert (new.seq_id, new.num_computed_tokens, new.page_ids) == (0, 6, kv.block_table(seqs[0]))
    assert not scheduler.schedule().message.reset_batch


def _with_priority(seq: Sequence, priority: int) -> Sequence:
    seq.request.priority = priority
    return seq


def test_priority_policy_admits_lower_values_first_and_preempts_the_least_urgent():
    kv = KVCacheManager(num_pages=5, page_size=4)  # 20 tokens for two 4 + 8-token sequences
    scheduler = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=64, policy="priority")
    low, high, urgent = (_with_priority(_make_seq(i, 4, 8), p) for i, p in enumerate((5, 1, 0)))
    for seq in (low, high, urgent):  # arrival order: least urgent first
        scheduler.add(seq)
    out = scheduler.schedule()
    assert [item.seq for item in out.scheduled] == [urgent, high]  # max_num_seqs = 2
    assert list(scheduler.waiting) == [low]
    # Decode until pages run out: the less urgent running sequence is preempted, not `urgent`.
    preempted = []
    for _ in range(12):
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.samples:
                item.seq.token_ids.append(7)
        out = scheduler.schedule()
        preempted += out.preempted
        if preempted:
            break
    assert preempted and preempted[0] is high and urgent in scheduler.running
    assert list(scheduler.waiting) == [high, low]  # back by its priority, ahead of `low`


def test_fcfs_ignores_priority_and_preempts_the_newest():
    kv = KVCacheManager(num_pages=64, page_size=4)
    scheduler = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=64)
    first, second, third = (_with_priority(_make_seq(i, 4, 8), p) for i, p in enumerate((5, 1, 0)))
    for seq in (first, second, third):
        scheduler.add(seq)
    assert [item.seq for item in scheduler.schedule().scheduled] == [first, second]
