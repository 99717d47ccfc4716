"""Random ragged-batch layouts, shared by the kernel tests and the kernels bench (and through it
the GPU kernel check)."""

from __future__ import annotations

import numpy as np

from pjllm.kernels.attention_metadata import AttentionMetadata


def random_ragged_layout(rng: np.random.Generator, q_lens: list[int], ctx_lens: list[int], *,
                         page_size: int, num_tokens: int, num_seqs: int, num_pages: int,
                         width: int, shared_pages: int = 0) -> AttentionMetadata:
    """Numpy AttentionMetadata for sequences with the given query and context lengths.

    Pages are drawn from a shuffled permutation of `num_pages` ids (non-contiguous block tables);
    each query token's slot points at its position in its sequence's pages; sequences past
    len(q_lens) and tokens past sum(q_lens) are padding. With `shared_pages`, every sequence's
    context begins with the same that many pages (a common prefix, as prefix caching shares
    it; every context must be at least that long).
    """
    perm = rng.permutation(num_pages)
    shared, perm = perm[:shared_pages], perm[shared_pages:]
    tables = np.zeros((num_seqs, width), np.int32)
    query_start_loc = np.zeros(num_seqs + 1, np.int32)
    seq_lens = np.zeros(num_seqs, np.int32)
    slots = np.full(num_tokens, -1, np.int32)
    used = 0
    for i, (q_len, ctx) in enumerate(zip(q_lens, ctx_lens)):
        pages = -(-ctx // page_size) - shared_pages
        assert pages >= 0, "a context shorter than the shared prefix"
        tables[i, :shared_pages] = shared
        tables[i, shared_pages:shared_pages + pages] = perm[used:used + pages]
        used += pages
        query_start_loc[i + 1] = query_start_loc[i] + q_len
        seq_lens[i] = ctx
        positions = np.arange(ctx - q_len, ctx)
        slots[query_start_loc[i]:query_start_loc[i + 1]] = (
            tables[i, positions // page_size] * page_size + positions % page_size)
    query_start_loc[len(q_lens) + 1:] = query_start_loc[len(q_lens)]
    return AttentionMetadata(slot_mapping=slots, query_start_loc=query_start_loc, seq_lens=seq_lens,
                             block_tables=tables)
