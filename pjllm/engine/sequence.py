"""Request and sequence state, as plain Python data (no JAX)."""

from __future__ import annotations

import dataclasses
import enum
import time

from pjllm.outputs import Logprob, PromptLogprobs, SampleLogprobs
from pjllm.sampling_params import SamplingParams


PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One generated stream: a prompt plus the tokens sampled so far, and where its KV lives.

    `num_computed_tokens` counts tokens whose KV is in its pages (its block table, which the
    KVCacheManager keeps); it starts at the length of the cached prefix the sequence was admitted
    with, the scheduler moves it forward by each step's chunk and resets it to 0 on preemption
    (the KV is recomputed later, or found cached).
    """

    seq_id: int
    request: "Request"
    sample_index: int
    seed: int
    token_ids: list[int]
    num_prompt_tokens: int
    # The sequence is complete at this many tokens (prompt + max_tokens, or max_model_len).
    max_num_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    text: str = ""
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Async scheduling: the last `num_pending` entries of token_ids are placeholders for tokens
    # still being sampled on device.
    num_pending: int = 0
    # Swap preemption: its KV pages in host memory while it waits (the runner's SwappedPages).
    swapped_kv: object = None
    # Incremental detokenization state: tokens before `read_offset` are in `text`;
    # decoding from `prefix_offset` gives the context that merges multi-token characters.
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_resolved_tokens(self) -> int:
        """Tokens whose ids the host knows (all but the pending placeholders)."""
        return len(self.token_ids) - self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        """Generated token ids known to the host."""
        return self.token_ids[self.num_prompt_tokens:self.num_resolved_tokens]

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, counting those still pending on device."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_complete(self) -> bool:
        """All tokens exist or are pending: nothing more to compute, only to confirm."""
        return self.num_tokens >= self.max_num_tokens and self.num_computed_tokens >= self.num_tokens - 1

    def add_pending_token(self) -> None:
        self.token_ids.append(PENDING_TOKEN)
        self.num_pending += 1

    def resolve_pending_token(self, token: int) -> None:
        """Replaces the oldest placeholder with the token the device sampled."""
        self.token_ids[len(self.token_ids) - self.num_pending] = token
        self.num_pending -= 1

    def drop_pending_tokens(self) -> None:
        """Forgets placeholders sampled after the sequence finished."""
        if self.num_pending:
            del self.token_ids[-self.num_pending:]
            self.num_pending = 0

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens


@dataclasses.dataclass(eq=False)
class Request:
    """A user request: one prompt, `params.n` sequences, prompt logprobs if asked."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...]
    seqs: list[Sequence] = dataclasses.field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None
    # time.monotonic() when it arrived, was first scheduled, and its first token reached the host.
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Extra key of the prefix cache: requests share cached pages only when their salts match.
    cache_salt: str | None = None
    # With scheduling_policy "priority": lower values are scheduled first and preempted last.
    priority: int = 0
    # Prompt tokens found in the prefix cache when it was first scheduled (None: not yet).
    num_cached_tokens: int | None = None

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def record_prompt_logprobs(self, position: int, entry: dict[int, Logprob]) -> None:
        """Stores the logprobs of prompt token `position` (predicted from position - 1)."""
        assert self.prompt_logprobs is not None
        self.prompt_logprobs[position] = entry
