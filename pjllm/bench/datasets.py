"""Synthetic benchmark workloads: random prompt token ids and fixed output lengths, EOS ignored.

This module needs only numpy, so the torch backend can load it without jax.

| name      | requests | prompt tokens                         | output tokens                         |
|-----------|----------|---------------------------------------|---------------------------------------|
| `chat`    | 1000     | lognormal, median 200, sigma 0.9      | lognormal, median 180, sigma 0.9      |
| `decode`  | 256      | 128                                   | 1024                                  |
| `prefill` | 512      | 1024                                  | 128                                   |
| `random`  | given    | `input_len`                           | `output_len`                          |

`chat` lengths are clipped to [4, 1024]. `num_prompts` overrides any dataset's request count.
Token ids are drawn uniformly from the vocabulary minus the ids in `exclude_ids` (BOS, EOS, pad).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Iterable, Sequence

import numpy as np

DATASETS = ("chat", "decode", "prefill", "random")
CHAT_NUM_PROMPTS = 1000
CHAT_PROMPT_MEDIAN = 200
CHAT_OUTPUT_MEDIAN = 180
CHAT_SIGMA = 0.9
CHAT_MIN_LEN = 4
CHAT_MAX_LEN = 1024
_FIXED = {"decode": (256, 128, 1024), "prefill": (512, 1024, 128)}  # (requests, in, out)
RANDOM_DEFAULTS = (256, 128, 128)


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: the prompt as token ids and how many tokens to generate."""

    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclasses.dataclass(frozen=True)
class Workload:
    """A named list of requests, reproducible from (name, vocab, seed, sizes)."""

    name: str
    requests: list[BenchRequest]
    seed: int

    @property
    def num_prompt_tokens(self) -> int:
        return sum(r.prompt_len for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    @property
    def max_total_len(self) -> int:
        """The longest prompt + output: the smallest `max_model_len` that holds every request."""
        return max(r.prompt_len + r.output_len for r in self.requests)

    def digest(self) -> str:
        """A short hash of every token id and output length: equal digests, identical workloads."""
        h = hashlib.sha256()
        for r in self.requests:
            h.update(np.asarray(r.prompt_token_ids, np.int64).tobytes())
            h.update(int(r.output_len).to_bytes(8, "little"))
        return h.hexdigest()[:16]

    def head(self, count: int, max_output_len: int | None = None) -> list[BenchRequest]:
        """The first `count` requests, outputs optionally capped (for a warm-up pass)."""
        out = self.requests[:count]
        if max_output_len is not None:
            out = [BenchRequest(r.prompt_token_ids, min(r.output_len, max_output_len)) for r in out]
        return out


def lognormal_lengths(rng: np.random.Generator, count: int, median: float, sigma: float,
                      low: int, high: int) -> np.ndarray:
    """`count` integer lengths, lognormal with the given median, rounded and clipped to [low, high]."""
    values = rng.lognormal(mean=math.log(median), sigma=sigma, size=count)
    return np.clip(np.rint(values), low, high).astype(np.int64)


def allowed_token_ids(vocab_size: int, exclude_ids: Iterable[int] = ()) -> np.ndarray:
    """The ids prompts are drawn from: [0, vocab_size) minus `exclude_ids`."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1; got {vocab_size}")
    excluded = np.asarray(sorted({int(t) for t in exclude_ids if 0 <= int(t) < vocab_size}), np.int64)
    ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), excluded)
    return ids if ids.size else np.arange(vocab_size, dtype=np.int64)


def random_requests(rng: np.random.Generator, prompt_lens: Sequence[int], output_lens: Sequence[int],
                    token_pool: np.ndarray) -> list[BenchRequest]:
    """One request per (prompt length, output length), prompt ids drawn from `token_pool`."""
    total = int(np.sum(prompt_lens))
    flat = token_pool[rng.integers(0, token_pool.size, total)]
    requests, cursor = [], 0
    for prompt_len, output_len in zip(prompt_lens, output_lens):
        ids = flat[cursor:cursor + int(prompt_len)]
        cursor += int(prompt_len)
        requests.append(BenchRequest([int(t) for t in ids], int(output_len)))
    return requests


def make_workload(name: str, vocab_size: int, seed: int = 0, num_prompts: int | None = None,
                  input_len: int | None = None, output_len: int | None = None,
                  exclude_ids: Iterable[int] = ()) -> Workload:
    """Builds dataset `name` (one of DATASETS); the same arguments always give the same workload.

    `input_len`/`output_len` apply to `random` only; `num_prompts` overrides any dataset's count.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    if name != "random" and (input_len is not None or output_len is not None):
        raise ValueError(f"--input-len/--output-len apply to the 'random' dataset only, not {name!r}")
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1; got {num_prompts}")
    rng = np.random.default_rng(seed)
    pool = allowed_token_ids(vocab_size, exclude_ids)
    if name == "chat":
        count = num_prompts or CHAT_NUM_PROMPTS
        prompt_lens = lognormal_lengths(rng, count, CHAT_PROMPT_MEDIAN, CHAT_SIGMA, CHAT_MIN_LEN,
                                        CHAT_MAX_LEN)
        output_lens = lognormal_lengths(rng, count, CHAT_OUTPUT_MEDIAN, CHAT_SIGMA, CHAT_MIN_LEN,
                                        CHAT_MAX_LEN)
    else:
        default_count, default_in, default_out = _FIXED.get(name, RANDOM_DEFAULTS)
        count = num_prompts or default_count
        length_in = input_len if input_len is not None else default_in
        length_out = output_len if output_len is not None else default_out
        if length_in < 1 or length_out < 1:
            raise ValueError(f"input_len and output_len must be >= 1; got {length_in}, {length_out}")
        prompt_lens = np.full(count, length_in)
        output_lens = np.full(count, length_out)
    return Workload(name, random_requests(rng, prompt_lens, output_lens, pool), seed)


def special_token_ids(hf_config: dict) -> set[int]:
    """BOS, EOS and pad ids named in an HF config dict (prompts avoid them)."""
    ids: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = hf_config.get(key)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
