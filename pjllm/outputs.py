"""What the engine returns: RequestOutput and CompletionOutput, shaped like vLLM's."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass
class Logprob:
    """One candidate token's log-probability, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class FlatLogprobs(Sequence[dict[int, Logprob]]):
    """Sample logprobs, one position per generated token: a sequence of {token id: Logprob}
    dicts (the chosen token first, then the top-N), stored as flat lists and built on access.

    As dicts of Logprob objects a step of 1,000 rows with 5 logprobs each makes some 7,000
    Python objects that live until their request ends, and the garbage collector walks them all
    again and again; lists of floats and ints it walks once each (vLLM's FlatLogprobs, likewise).
    A slice is a FlatLogprobs; `snapshot()` shares the lists, frozen at today's length.
    """

    __slots__ = ("starts", "token_ids", "logprobs", "ranks", "decoded_tokens", "_frozen_len")

    def __init__(self) -> None:
        self.starts: list[int] = [0]  # position i spans [starts[i], starts[i + 1])
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.ranks: list[int] = []
        self.decoded_tokens: list[str | None] = []
        self._frozen_len: int | None = None

    def append(self, token_ids: list[int], logprobs: list[float], ranks: list[int],
               decoded_tokens: list[str | None]) -> None:
        """Adds one position: its tokens (the chosen one first), their logprobs, ranks, texts."""
        if self._frozen_len is not None:
            raise TypeError("a FlatLogprobs snapshot is read-only")
        self.token_ids += token_ids
        self.logprobs += logprobs
        self.ranks += ranks
        self.decoded_tokens += decoded_tokens
        self.starts.append(len(self.token_ids))

    def append_sample(self, token: int, logprob: float, rank: int, top_ids: list[int],
                      top_logprobs: list[float], decode=None) -> None:
        """Adds the position of a sampled `token` (its logprob and rank) and the row's top-N
        (ranks 1..N), the sampled token not repeated. decode: token id -> text, or None."""
        ids, values, ranks = [token], [logprob], [rank]
        for index, candidate in enumerate(top_ids):
            if candidate != token:
                ids.append(candidate)
                values.append(top_logprobs[index])
                ranks.append(index + 1)
        self.append(ids, values, ranks,
                    [None] * len(ids) if decode is None else [decode(t) for t in ids])

    def position(self, index: int) -> tuple[list[int], list[float], list[int], list[str | None]]:
        """Position `index`'s (token ids, logprobs, ranks, decoded tokens), the chosen first."""
        start, end = self.starts[index], self.starts[index + 1]
        return (self.token_ids[start:end], self.logprobs[start:end], self.ranks[start:end],
                self.decoded_tokens[start:end])

    def snapshot(self) -> "FlatLogprobs":
        """A read-only view of the positions so far (the lists only grow, so it stays valid)."""
        view = FlatLogprobs.__new__(FlatLogprobs)
        view.starts, view.token_ids, view.logprobs = self.starts, self.token_ids, self.logprobs
        view.ranks, view.decoded_tokens = self.ranks, self.decoded_tokens
        view._frozen_len = len(self)
        return view

    def __len__(self) -> int:
        return len(self.starts) - 1 if self._frozen_len is None else self._frozen_len

    def __getitem__(self, index):
        if isinstance(index, slice):
            out = FlatLogprobs()
            for i in range(*index.indices(len(self))):
                out.append(*self.position(i))
            return out
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("FlatLogprobs index out of range")
        start, end = self.starts[index], self.starts[index + 1]
        return {self.token_ids[i]: Logprob(self.logprobs[i], self.ranks[i], self.decoded_tokens[i])
                for i in range(start, end)}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"FlatLogprobs({list(self)!r})"


# One dict per position: token id -> Logprob (the chosen token plus the top-N).
SampleLogprobs = FlatLogprobs
# Prompt logprobs have None at position 0 (nothing predicts the first token).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with n > 1 has n of them)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop", "length", "abort", or an error message
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    """When a request arrived, was first scheduled, and its first token reached the host
    (time.monotonic() seconds; None: not yet)."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None


@dataclasses.dataclass
class RequestOutput:
    """The state of one request: its prompt and its completions so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    # Prompt tokens found in the prefix cache (their KV was reused, not computed); None before
    # the request is first scheduled.
    num_cached_tokens: int | None = None
