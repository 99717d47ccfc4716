"""The ragged batch description that every attention implementation reads."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


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
    common_prefix_len: []    None, or a whole number of pages of tokens that begin every real
                             sequence's context in the same pages (block_tables[0]'s first
                             ones), all before every query token: attention may then read them
                             once for the whole batch (cascade attention). None and 0 are one
                             result; None selects the programs that never look for a prefix.
    """

    slot_mapping: jax.Array
    query_start_loc: jax.Array
    seq_lens: jax.Array
    block_tables: jax.Array
    common_prefix_len: jax.Array | None = None

    def after_common_prefix(self, page_size: int) -> "AttentionMetadata":
        """The same batch with the common prefix cut off every context: seq_lens shortened by it
        and block tables shifted past its pages (no common prefix claimed)."""
        prefix_len = self.common_prefix_len.astype(jnp.int32)
        width = self.block_tables.shape[1]
        columns = jnp.minimum(jnp.arange(width, dtype=jnp.int32) + prefix_len // page_size,
                              width - 1)
        return dataclasses.replace(
            self, seq_lens=jnp.maximum(self.seq_lens.astype(jnp.int32) - prefix_len, 0),
            block_tables=self.block_tables[:, columns], common_prefix_len=None)
