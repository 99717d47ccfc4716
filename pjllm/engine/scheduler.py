"""Continuous batching: which sequences run this step and with how many tokens. Plain Python."""

from __future__ import annotations

import collections
import dataclasses

from pjllm.engine.kv_cache_manager import KVCacheManager
from pjllm.engine.sequence import Sequence, SequenceStatus


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # query tokens this step: a prefill chunk, or 1 for a decode

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's last known token, so its logits sample."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """One token budget per step, spent first on running sequences (oldest first), then on
    waiting ones (FIFO). Prefills are chunked to fit the budget. When pages run out, the most
    recently admitted running sequence is preempted: its pages are freed and it goes back to the
    front of the queue to be recomputed. A sequence that fits the cache alone always progresses,
    so there is no deadlock.
    """

    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv_cache_manager = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

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
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv_cache_manager.allocate_slots(seq, num_new):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return SchedulerOutput(scheduled, preempted)

    def preempt(self, seq: Sequence) -> None:
        """Frees a running sequence's pages and puts it at the front of the queue, to be
        recomputed from its tokens when it is admitted again."""
        self.num_preemptions += 1
        self.running.remove(seq)
        self.kv_cache_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, finish_reason: str, stop_reason: int | str | None = None) -> None:
        """Marks `seq` finished and frees its pages at once, wherever it is queued."""
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = finish_reason
        seq.stop_reason = stop_reason
        self.kv_cache_manager.free(seq)
        seq.drop_pending_tokens()
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
