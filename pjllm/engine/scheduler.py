"""Continuous batching: which sequences run this step and with how many tokens. Plain Python."""

from __future__ import annotations

import collections
import dataclasses

from pjllm.engine.kv_cache_manager import KVCacheManager
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

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """One token budget per step, spent first on running sequences (oldest first), then on
    waiting ones (FIFO). Prefills are chunked to fit the budget. When pages run out, the most
    recently admitted running sequence is preempted: its pages are freed and it goes back to the
    front of the queue to be recomputed. A sequence that fits the cache alone always progresses,
    so there is no deadlock.

    It also knows which sequences the model runner holds, and how many of their pages, so that
    each step's message (`ScheduledStep.message`) carries only what changed.
    """

    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv_cache_manager = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # seq_id -> pages the runner has of it, for each sequence the runner holds.
        self._pages_sent: dict[int, int] = {}
        # Held sequences finished or preempted since the last message, and whether the runner must
        # drop its whole batch first; both wait for the next message.
        self._removed: list[int] = []
        self._reset_runner = False

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
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
        return ScheduledStep(scheduled, preempted, self._message(scheduled))

    def _message(self, scheduled: list[ScheduledSeq]) -> SchedulerOutput:
        """The runner's diff for this step; marks what it sends as held by the runner."""
        new_seqs, new_pages, seq_ids, counts = [], {}, [], []
        pages_sent = self._pages_sent
        for item in scheduled:
            seq = item.seq
            seq_id, num_pages = seq.seq_id, len(seq.block_table)
            seq_ids.append(seq_id)
            counts.append(item.num_new_tokens)
            sent = pages_sent.get(seq_id)
            if sent == num_pages:
                continue
            if sent is None:
                new_seqs.append(_new_sequence(seq))
            else:
                new_pages[seq_id] = seq.block_table[sent:]
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

    def preempt(self, seq: Sequence) -> None:
        """Frees a running sequence's pages and puts it at the front of the queue, to be
        recomputed from its tokens when it is admitted again."""
        self.num_preemptions += 1
        self.running.remove(seq)
        self.kv_cache_manager.free(seq)
        self._release_from_runner(seq)
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
        self._release_from_runner(seq)
        seq.drop_pending_tokens()
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)


def _new_sequence(seq: Sequence) -> NewSequence:
    # A sequence joins the runner's batch only once the host knows all its tokens: one preempted
    # with a token in flight is readmitted at the earliest one step later, after that token came.
    assert seq.num_pending == 0, f"sequence {seq.seq_id} joins the runner with a token in flight"
    params = seq.params
    return NewSequence(
        seq_id=seq.seq_id, token_ids=list(seq.token_ids), num_prompt_tokens=seq.num_prompt_tokens,
        num_computed_tokens=seq.num_computed_tokens, params=params, seed=seq.seed,
        sample_index=seq.sample_index,
        banned_while_short=tuple(seq.request.eos_token_ids) + tuple(params.stop_token_ids),
        page_ids=list(seq.block_table))
