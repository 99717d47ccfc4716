"""Continuous batching: which sequences run this step and with how many tokens. Plain Python."""

from __future__ import annotations

import bisect
import collections
import dataclasses

from pjllm.engine.kv_cache_manager import KVCacheManager, pages_needed
from pjllm.engine.sequence import Sequence, SequenceStatus
from pjllm.scheduler_output import NewSequence, SchedulerOutput


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # query tokens this step: a prefill chunk, or 1 for a decode

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's last known token, so its logits sample."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclasses.dataclass
class ScheduledStep:
    """What `Scheduler.schedule` decided, twice: as the engine's sequences, which it needs to
    process the step's results, and as the runner's message, a diff over the batch it holds."""

    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    message: SchedulerOutput
    # Swap preemption, for the engine to carry out before the step: (sequence, pages) whose KV
    # goes to host memory, and (sequence, pages) it comes back into.
    swap_out: list[tuple[Sequence, list[int]]] = dataclasses.field(default_factory=list)
    swap_in: list[tuple[Sequence, list[int]]] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


def _enqueue(seqs, seq: Sequence, policy: str) -> None:
    """Adds `seq` to a list in admission order: at the end ("fcfs"), or by WaitingQueue.key
    ("priority")."""
    if policy == "fcfs":
        seqs.append(seq)
    else:
        bisect.insort(seqs, seq, key=WaitingQueue.key)


class WaitingQueue:
    """Sequences waiting to run, in the order they are admitted: arrival order ("fcfs"), or
    (priority, arrival) with lower priority values first ("priority"). A preempted sequence goes
    back in front (fcfs) or where its key puts it (priority)."""

    def __init__(self, policy: str = "fcfs"):
        self.policy = policy
        self._seqs: collections.deque[Sequence] | list[Sequence] = (
            collections.deque() if policy == "fcfs" else [])

    @staticmethod
    def key(seq: Sequence) -> tuple:
        """(priority, arrival, id): smaller goes first."""
        return seq.request.priority, seq.request.arrival_time, seq.seq_id

    def add(self, seq: Sequence) -> None:
        _enqueue(self._seqs, seq, self.policy)

    def add_preempted(self, seq: Sequence) -> None:
        if self.policy == "fcfs":
            self._seqs.appendleft(seq)
        else:
            self.add(seq)

    def peek(self) -> Sequence:
        return self._seqs[0]

    def pop(self) -> Sequence:
        return self._seqs.popleft() if self.policy == "fcfs" else self._seqs.pop(0)

    def remove(self, seq: Sequence) -> None:
        self._seqs.remove(seq)

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self._seqs

    def __iter__(self):
        return iter(self._seqs)

    def __len__(self) -> int:
        return len(self._seqs)


class Scheduler:
    """One token budget per step, spent first on running sequences, then on waiting ones, each
    of which starts after its cached prefix (prefix caching). Prefills are chunked to fit the
    budget. Both lists are in admission order: arrival ("fcfs"), or (priority, arrival) with
    lower priority values first ("priority"). When pages run out, the last running sequence (the
    newest, or the least urgent) is preempted: its pages are freed and it goes back to the
    waiting queue, in front (fcfs) or by its key, to be recomputed or swapped back in. A
    sequence that fits the cache alone always progresses, so there is no deadlock.

    It also knows which sequences the model runner holds, and how many of their pages, so that
    each step's message (`ScheduledStep.message`) carries only what changed.
    """

    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "fcfs", num_swap_pages: int = 0):
        """num_swap_pages: pages of host memory for swap preemption (0: always recompute)."""
        self.kv_cache_manager = kv_cache_manager
        self.num_swap_pages = num_swap_pages
        self.num_swapped_pages = 0
        self.num_swaps = 0
        # seq_id -> tokens whose KV a preempted sequence has in host memory.
        self.swapped: dict[int, int] = {}
        self._swap_out: list[tuple[Sequence, list[int]]] = []
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.waiting = WaitingQueue(policy)
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # seq_id -> pages the runner has of it, for each sequence the runner holds.
        self._pages_sent: dict[int, int] = {}
        # Held sequences finished or preempted since the last message, and whether the runner must
        # drop its whole batch first; both wait for the next message.
        self._removed: list[int] = []
        self._reset_runner = False

    def add(self, seq: Sequence) -> None:
        self.waiting.add(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        swap_in: list[tuple[Sequence, list[int]]] = []

        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if seq.is_complete:  # its last token is pending; the engine finishes it next
                index += 1
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv_cache_manager.allocate_slots(seq, num_new):
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                index += 1

        # New work waits while anything was preempted this step: memory is short already.
        manager = self.kv_cache_manager
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting.peek()
            # A waiting sequence holds no pages (new, or preempted): it starts after the longest
            # cached prefix of its tokens, or after its KV swapped to host memory.
            swapped = self.swapped.get(seq.seq_id)
            seq.num_computed_tokens = (manager.claim_cached_prefix(seq) if swapped is None
                                       else swapped)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not manager.allocate_slots(seq, num_new):
                manager.free(seq, finished=False)
                seq.num_computed_tokens = 0
                break
            if swapped is None:
                manager.count_prefix_lookup(seq.num_resolved_tokens, seq.num_computed_tokens)
            else:
                num_pages = pages_needed(swapped, manager.page_size)
                swap_in.append((seq, manager.block_table(seq)[:num_pages]))
                self._drop_swap(seq)
            self.waiting.pop()
            seq.status = SequenceStatus.RUNNING
            _enqueue(self.running, seq, self.policy)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        swap_out, self._swap_out = self._swap_out, []
        return ScheduledStep(scheduled, preempted, self._message(scheduled), swap_out, swap_in)

    def _message(self, scheduled: list[ScheduledSeq]) -> SchedulerOutput:
        """The runner's diff for this step; marks what it sends as held by the runner."""
        new_seqs, new_pages, seq_ids, counts = [], {}, [], []
        pages_sent = self._pages_sent
        for item in scheduled:
            seq = item.seq
            table = self.kv_cache_manager.block_table(seq)
            seq_id, num_pages = seq.seq_id, len(table)
            seq_ids.append(seq_id)
            counts.append(item.num_new_tokens)
            sent = pages_sent.get(seq_id)
            if sent == num_pages:
                continue
            if sent is None:
                new_seqs.append(_new_sequence(seq, table))
            else:
                new_pages[seq_id] = table[sent:]
            pages_sent[seq_id] = num_pages
        # Only a message that schedules something reaches the runner: the rest waits for one.
        removed, reset = [], False
        if scheduled:
            removed, self._removed = self._removed, []
            reset, self._reset_runner = self._reset_runner, False
        return SchedulerOutput(reset, removed, new_seqs, new_pages, seq_ids, counts)

    def reset_runner_batch(self) -> None:
        """For when a message may not have reached the runner (preparing or launching a step
        failed, or was interrupted): the next message has it drop its whole batch, and each
        sequence is sent again as new when it is next scheduled."""
        self._pages_sent.clear()
        self._removed.clear()
        self._reset_runner = True

    def _release_from_runner(self, seq: Sequence) -> None:
        if self._pages_sent.pop(seq.seq_id, None) is not None:
            self._removed.append(seq.seq_id)

    def preempt(self, seq: Sequence, allow_swap: bool = True) -> None:
        """Frees a running sequence's pages and puts it back in the waiting queue. With swap
        space left (and `allow_swap`), its computed KV goes to host memory first (the next
        ScheduledStep's `swap_out`) and comes back when it is admitted again; else it is
        recomputed from its tokens (or found in the prefix cache)."""
        self.num_preemptions += 1
        self.running.remove(seq)
        manager = self.kv_cache_manager
        num_pages = pages_needed(seq.num_computed_tokens, manager.page_size)
        # (A sequence that gave pages back outside its window is recomputed.)
        if (allow_swap and 0 < num_pages <= self.num_swap_pages - self.num_swapped_pages
                and not manager.num_released_pages(seq)):
            self._swap_out.append((seq, manager.block_table(seq)[:num_pages]))
            self.swapped[seq.seq_id] = seq.num_computed_tokens
            self.num_swapped_pages += num_pages
            self.num_swaps += 1
        manager.free(seq, finished=False)
        self._release_from_runner(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.add_preempted(seq)

    def _drop_swap(self, seq: Sequence) -> None:
        """Forgets `seq`'s KV in host memory (swapped back in, or no longer wanted)."""
        swapped = self.swapped.pop(seq.seq_id, None)
        if swapped is not None:
            self.num_swapped_pages -= pages_needed(swapped, self.kv_cache_manager.page_size)

    def drop_swapped(self) -> None:
        """Forgets all KV in host memory: those sequences will be recomputed (after a failed
        step, when what was swapped out may never have been read)."""
        self._swap_out.clear()  # copies a schedule() cut short had not handed out
        for seq in list(self.waiting):
            self._drop_swap(seq)
            seq.swapped_kv = None

    def finish(self, seq: Sequence, finish_reason: str, stop_reason: int | str | None = None) -> None:
        """Marks `seq` finished and frees its pages at once, wherever it is queued."""
        if seq.is_finished:
            return
        self._drop_swap(seq)
        seq.swapped_kv = None
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = finish_reason
        seq.stop_reason = stop_reason
        self.kv_cache_manager.free(seq)
        self._release_from_runner(seq)
        seq.drop_pending_tokens()
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)


def _new_sequence(seq: Sequence, block_table: list[int]) -> NewSequence:
    # A sequence joins the runner's batch only once the host knows all its tokens: one preempted
    # with a token in flight is readmitted at the earliest one step later, after that token came.
    assert seq.num_pending == 0, f"sequence {seq.seq_id} joins the runner with a token in flight"
    params = seq.params
    return NewSequence(
        seq_id=seq.seq_id, token_ids=list(seq.token_ids), num_prompt_tokens=seq.num_prompt_tokens,
        num_computed_tokens=seq.num_computed_tokens, params=params, seed=seq.seed,
        sample_index=seq.sample_index,
        banned_while_short=tuple(seq.request.eos_token_ids) + tuple(params.stop_token_ids),
        page_ids=list(block_table))
