"""The step's inputs cross to the device as two int32 buffers and come back whole in a program."""

import dataclasses

import jax
import numpy as np

from pjllm.runner.packing import buffer_sizes, layout_of, pack, unpack
from pjllm.runner.step import dummy_batch


def _random_batch(tokens: int, seqs: int, cascade: bool):
    rng = np.random.default_rng(tokens)

    def fill(leaf):
        if leaf.dtype == np.float32:
            return rng.standard_normal(leaf.shape).astype(np.float32)
        return rng.integers(-5, 1 << 30, leaf.shape).astype(leaf.dtype)

    return jax.tree.map(fill, dummy_batch(tokens, seqs, cascade=cascade))


def test_a_packed_batch_unpacks_to_the_same_arrays_in_a_program():
    for tokens, seqs, cascade in [(64, 16, False), (40, 8, True)]:
        batch = _random_batch(tokens, seqs, cascade)
        layout = layout_of(batch)
        token_buffer, sequence_buffer = pack(batch)
        assert (len(token_buffer), len(sequence_buffer)) == buffer_sizes(layout)
        got = jax.jit(unpack, static_argnums=0)(layout, token_buffer, sequence_buffer)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(b), a), batch, got)
        assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, batch)


def test_the_sequence_buffer_holds_what_the_sampler_reads_and_does_not_depend_on_the_tokens():
    small, large = _random_batch(16, 8, False), _random_batch(64, 8, True)
    large = dataclasses.replace(large, sampling=small.sampling, seq_rows=small.seq_rows,
                                attention=dataclasses.replace(large.attention,
                                                              seq_lens=small.attention.seq_lens))
    assert np.array_equal(pack(small)[1], pack(large)[1])
    sequence_only = unpack(layout_of(large), None, pack(large)[1])
    jax.tree.map(np.testing.assert_array_equal, sequence_only.sampling, small.sampling)
    np.testing.assert_array_equal(sequence_only.seq_rows, small.seq_rows)
    assert sequence_only.token_ids is None
