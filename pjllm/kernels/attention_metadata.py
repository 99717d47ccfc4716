"""The ragged batch description that every attention implementation reads."""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of a flattened ragged batch lives, as fixed-shape int32 arrays.

    T is the token bucket, N the sequence bucket, W = max pages per sequence.
    Sequence i owns query tokens [query_start_loc[i], query_start_loc[i+1]); its context is
    seq_lens[i] tokens long, the last (query_start_loc[i+1] - query_start_loc[i]) of which are
    this step's query tokens (prefill chunk, or one decode token). Padding sequences have
    q_len 0 and seq_len 0; padding tokens lie after query_start_loc[N] and have slot -1.

    slot_mapping:    [T]     page * page_size + offset where the token's K/V is written; -1 = nowhere.
    query_start_loc: [N + 1] cumulative query lengths, query_start_loc[0] == 0.
    seq_lens:        [N]     context length after this step's tokens are written.
    block_tables:    [N, W]  page ids of each sequence, in order; unused entries are 0.
    """

    slot_mapping: jax.Array
    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_tables: jax.Array
