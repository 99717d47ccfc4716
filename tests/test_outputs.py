"""FlatLogprobs: sample logprobs as flat lists, read as one {token id: Logprob} dict per position."""

from __future__ import annotations

import gc
import pickle

import pytest

from pjllm.outputs import FlatLogprobs, Logprob


def two_positions() -> FlatLogprobs:
    out = FlatLogprobs()
    # Sampled token 7 is also the row's most likely: not repeated among the top-N.
    out.append_sample(7, -0.1, 1, [7, 3, 9], [-0.1, -2.5, -3.0], decode=lambda t: f"<{t}>")
    out.append_sample(4, -5.0, 12, [1, 2], [-0.5, -0.7])
    return out


def test_positions_read_as_dicts_sampled_token_first():
    out = two_positions()
    assert len(out) == 2
    assert out[0] == {7: Logprob(-0.1, 1, "<7>"), 3: Logprob(-2.5, 2, "<3>"),
                      9: Logprob(-3.0, 3, "<9>")}
    assert list(out[1]) == [4, 1, 2]
    assert out[1][4] == Logprob(-5.0, 12, None) and out[1][2].rank == 2
    assert out[-1] == out[1]
    with pytest.raises(IndexError):
        out[2]
    assert out == [out[0], out[1]] and out != [out[0]]


def test_slices_snapshots_and_pickling():
    out = two_positions()
    tail = out[1:]
    assert isinstance(tail, FlatLogprobs) and tail == [out[1]]
    view = out.snapshot()
    out.append_sample(5, -1.0, 2, [6], [-0.2])
    assert len(view) == 2 and len(out) == 3 and view == out[:2]
    with pytest.raises(TypeError):
        view.append_sample(1, 0.0, 1, [], [])
    assert pickle.loads(pickle.dumps(out)) == out
    assert pickle.loads(pickle.dumps(view)) == view


def test_positions_add_no_objects_for_the_garbage_collector():
    """The point of the flat layout: 1,000 positions of 6 entries are a handful of tracked
    objects (the lists), not some 7,000 dicts and Logprobs the collector keeps walking."""
    out = FlatLogprobs()
    gc.collect()
    before = len(gc.get_objects())
    for i in range(1000):
        out.append_sample(i, -1.0, 3, [1, 2, 3, 4, 5], [-0.1, -0.2, -0.3, -0.4, -0.5])
    gc.collect()
    assert len(gc.get_objects()) - before < 50
