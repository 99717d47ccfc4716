"""SamplingParams: how to sample one request, validated at the edge."""

from __future__ import annotations

import dataclasses

from pjllm.validation import as_float32, is_int


def _fail(field: str, allowed: str, value: object) -> None:
    raise ValueError(f"SamplingParams.{field} must be {allowed}; got {value!r}")


@dataclasses.dataclass
class SamplingParams:
    """Per-request sampling settings, with vLLM's names and meanings.

    temperature 0 means greedy. top_k <= 0 and top_p == 1 turn those filters off; a top_k at or
    above the vocabulary size is off too. `seed` makes the request's samples reproducible
    whatever else shares the batch. `logprobs` / `prompt_logprobs` ask for the top-N
    log-probabilities of each generated / prompt token (N at most the engine's max_logprobs).

    Every field is checked here (types, ranges, finiteness); what needs the model (vocabulary,
    max_model_len, max_num_seqs) is checked when the request is added to an engine.
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
        if not is_int(self.n) or self.n < 1:
            _fail("n", "an integer >= 1", self.n)
        self._check_real("temperature", ">= 0", lambda x: x >= 0)
        self._check_real("top_p", "in (0, 1]", lambda x: 0.0 < x <= 1.0)
        if not is_int(self.top_k) or self.top_k < -1:
            _fail("top_k", "an integer >= -1 (0 or -1 disables it)", self.top_k)
        self._check_real("min_p", "in [0, 1]", lambda x: 0.0 <= x <= 1.0)
        self._check_real("presence_penalty", "in [-2, 2]", lambda x: -2.0 <= x <= 2.0)
        self._check_real("frequency_penalty", "in [-2, 2]", lambda x: -2.0 <= x <= 2.0)
        self._check_real("repetition_penalty", "> 0", lambda x: x > 0.0)
        if self.seed is not None and not is_int(self.seed):
            _fail("seed", "an integer or None", self.seed)
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            _fail("max_tokens", "an integer >= 1 or None", self.max_tokens)
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            _fail("min_tokens", "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(self, field)
            if value is not None and (not is_int(value) or value < 0):
                _fail(field, "an integer >= 0 or None", value)
        for field in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, field), bool):
                _fail(field, "True or False", getattr(self, field))
        self.stop = self._string_list(self.stop)
        self.stop_token_ids = self._token_id_list(self.stop_token_ids)
        # Plain Python ints from here on (numpy integers are accepted as input).
        for field in ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs"):
            if getattr(self, field) is not None:
                setattr(self, field, int(getattr(self, field)))

    def _check_real(self, field: str, allowed: str, in_range) -> None:
        """Checks the value the device will see (float32); keeps it as a Python float."""
        value = getattr(self, field)
        on_device = as_float32(value)
        if on_device is None or not in_range(on_device):
            _fail(field, f"a finite number {allowed} (in float32)", value)
        setattr(self, field, float(value))

    @staticmethod
    def _string_list(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
            _fail("stop", "a non-empty string or a list of them", stop)
        return list(stop)

    @staticmethod
    def _token_id_list(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)) or any(not is_int(t) or t < 0 for t in ids):
            _fail("stop_token_ids", "a list of non-negative integer token ids", ids)
        return [int(t) for t in ids]

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def uses_penalties(self) -> bool:
        """Whether sampling reads the tokens generated so far (presence/frequency/repetition)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
