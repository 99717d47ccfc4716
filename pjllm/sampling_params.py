"""SamplingParams: how to sample one request, validated at the edge."""

from __future__ import annotations

import dataclasses

MAX_LOGPROBS = 20


@dataclasses.dataclass
class SamplingParams:
    """Per-request sampling settings, with vLLM's names and meanings.

    temperature 0 means greedy. top_k <= 0 and top_p == 1 turn those filters off. `seed` makes the
    request's samples reproducible whatever else shares the batch. `logprobs` / `prompt_logprobs`
    ask for the top-N log-probabilities of each generated / prompt token (N <= 20).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        def fail(field: str, allowed: str, value: object) -> None:
            raise ValueError(f"SamplingParams.{field} must be {allowed}; got {value!r}")

        if not isinstance(self.n, int) or self.n < 1:
            fail("n", "an integer >= 1", self.n)
        if self.temperature < 0:
            fail("temperature", ">= 0", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "in (0, 1]", self.top_p)
        if not isinstance(self.top_k, int) or self.top_k < -1:
            fail("top_k", "an integer >= -1 (0 or -1 disables it)", self.top_k)
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", "in [0, 1]", self.min_p)
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail("presence_penalty", "in [-2, 2]", self.presence_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail("frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        if self.repetition_penalty <= 0.0:
            fail("repetition_penalty", "> 0", self.repetition_penalty)
        if self.seed is not None and not isinstance(self.seed, int):
            fail("seed", "an integer or None", self.seed)
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail("max_tokens", "an integer >= 1 or None", self.max_tokens)
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail("min_tokens", "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                fail(field, f"an integer in [0, {MAX_LOGPROBS}] or None", value)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "a non-empty string or a list of them", self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "a list of non-negative integers", self.stop_token_ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def uses_penalties(self) -> bool:
        """Whether sampling reads the tokens generated so far (presence/frequency/repetition)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
