"""Beam search over the engine, as vLLM's `LLM.beam_search` and scored as HF transformers scores
beams. Each step asks the engine for one token of every live beam with its top 2 x beam_width
logprobs; beams share their pages through the prefix cache, so a step computes only each beam's
last, partly filled page."""

from __future__ import annotations

import dataclasses

from pjllm.outputs import Logprob
from pjllm.validation import is_int


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    """beam_width: beams kept per prompt; max_tokens: tokens each beam generates at most;
    ignore_eos: keep extending a beam past EOS (else a beam that ends in EOS is finished);
    length_penalty: a beam's score is cum_logprob / output_len ** length_penalty."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"BeamSearchParams.{name} must be an integer >= 1; got {value!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"BeamSearchParams.ignore_eos must be True or False; got {self.ignore_eos!r}")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)):
            raise ValueError("BeamSearchParams.length_penalty must be a number; got "
                             f"{self.length_penalty!r}")


@dataclasses.dataclass
class BeamSearchSequence:
    """One beam: every token id (prompt then output), the logprobs of its output tokens (each
    position's top 2 x beam_width entries), their sum, and its output text."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (ended in EOS) or "length"
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]

    def score(self, length_penalty: float) -> float:
        """HF's beam score: the output's summed logprobs over its length ** length_penalty."""
        return self.cum_logprob / max(len(self.output_token_ids), 1) ** length_penalty


@dataclasses.dataclass
class BeamSearchOutput:
    """A prompt's beams, best score first."""

    sequences: list[BeamSearchSequence]


def extend_beams(beams: list[BeamSearchSequence], entries: list[dict[int, Logprob]],
                 params: BeamSearchParams, eos_token_ids: tuple[int, ...]
                 ) -> tuple[list[BeamSearchSequence], list[BeamSearchSequence]]:
    """One step for one prompt: every beam extended by each of its next-token `entries`
    (entries[i] for beams[i]). Returns (the beam_width best candidates by cum_logprob that do not
    end in EOS, the candidates ranked among the first beam_width that do), as HF's beam search
    keeps them."""
    candidates = []
    for beam, entry in zip(beams, entries):
        for token, logprob in entry.items():
            candidates.append((beam.cum_logprob + logprob.logprob, beam, token, entry))
    candidates.sort(key=lambda c: -c[0])
    live, finished = [], []
    for rank, (cum_logprob, beam, token, entry) in enumerate(candidates):
        ends = not params.ignore_eos and token in eos_token_ids
        if ends and rank >= params.beam_width:
            continue
        grown = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [entry], cum_logprob,
                                   finish_reason="stop" if ends else None,
                                   num_prompt_tokens=beam.num_prompt_tokens)
        (finished if ends else live).append(grown)
        if len(live) == params.beam_width:
            break
    return live, finished


def best_beams(finished: list[BeamSearchSequence], live: list[BeamSearchSequence],
               params: BeamSearchParams) -> list[BeamSearchSequence]:
    """The beam_width best of a prompt's finished and still-running beams by score; running
    ones end with finish reason "length"."""
    for beam in live:
        beam.finish_reason = "length"
    ranked = sorted(finished + live, key=lambda b: -b.score(params.length_penalty))
    return ranked[:params.beam_width]
