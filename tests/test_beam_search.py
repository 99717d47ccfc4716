"""Beam search's bookkeeping on its own: candidates, EOS, scores, bad parameters."""

import pytest

from pjllm.beam_search import BeamSearchParams, BeamSearchSequence, best_beams, extend_beams
from pjllm.outputs import Logprob

EOS = 2


def _entry(**logprobs) -> dict[int, Logprob]:
    return {int(token[1:]): Logprob(value) for token, value in logprobs.items()}


def test_the_best_candidates_over_all_beams_survive():
    params = BeamSearchParams(beam_width=2, max_tokens=4)
    beams = [BeamSearchSequence([9, 5], [], -1.0, num_prompt_tokens=1),
             BeamSearchSequence([9, 6], [], -0.2, num_prompt_tokens=1)]
    live, finished = extend_beams(beams, [_entry(t7=-0.1, t8=-3.0), _entry(t7=-1.5, t8=-0.5)],
                                  params, (EOS,))
    assert [(b.tokens, round(b.cum_logprob, 6)) for b in live] == [([9, 6, 8], -0.7), ([9, 5, 7], -1.1)]
    assert finished == []


def test_eos_finishes_a_beam_only_within_the_first_beam_width_ranks():
    params = BeamSearchParams(beam_width=2, max_tokens=4)
    beam = BeamSearchSequence([9], [], 0.0, num_prompt_tokens=1)
    live, finished = extend_beams([beam], [_entry(t2=-0.1, t4=-0.2, t5=-0.3)], params, (EOS,))
    assert [b.tokens for b in finished] == [[9, 2]] and finished[0].finish_reason == "stop"
    assert [b.tokens for b in live] == [[9, 4], [9, 5]]
    # Ranked below beam_width, an EOS candidate is dropped (HF's rule).
    live, finished = extend_beams([beam], [_entry(t4=-0.1, t5=-0.2, t2=-0.3)], params, (EOS,))
    assert finished == [] and [b.tokens for b in live] == [[9, 4], [9, 5]]
    # ignore_eos: EOS is a token like any other.
    live, _ = extend_beams([beam], [_entry(t2=-0.1, t4=-0.2)], BeamSearchParams(2, 4, ignore_eos=True),
                           (EOS,))
    assert [b.tokens for b in live] == [[9, 2], [9, 4]]


def test_scores_divide_by_output_length_to_the_length_penalty():
    short = BeamSearchSequence([1, 2, 3], [], -2.0, finish_reason="stop", num_prompt_tokens=1)
    long = BeamSearchSequence([1, 2, 3, 4, 5], [], -3.0, num_prompt_tokens=1)
    assert short.score(1.0) == -1.0 and long.score(1.0) == -0.75 and long.score(0.0) == -3.0
    best = best_beams([short], [long], BeamSearchParams(beam_width=1, max_tokens=4))
    assert best == [long] and long.finish_reason == "length"
    assert best_beams([short], [long], BeamSearchParams(1, 4, length_penalty=0.0)) == [short]


@pytest.mark.parametrize("kwargs,field", [({"beam_width": 0, "max_tokens": 4}, "beam_width"),
                                          ({"beam_width": 2, "max_tokens": 1.5}, "max_tokens"),
                                          ({"beam_width": 2, "max_tokens": 4, "ignore_eos": 1},
                                           "ignore_eos"),
                                          ({"beam_width": 2, "max_tokens": 4,
                                            "length_penalty": "x"}, "length_penalty")])
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"BeamSearchParams.{field}"):
        BeamSearchParams(**kwargs)
