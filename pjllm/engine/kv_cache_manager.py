"""The page allocator: which KV pages each sequence owns. Plain Python, no JAX."""

from __future__ import annotations

import collections

from pjllm.engine.sequence import Sequence


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class KVCacheManager:
    """Hands out pages of the global KV page arrays to sequences and takes them back.

    Invariants (checked by `check_invariants`, used by the property tests): every page is either
    free or owned by exactly one sequence; a sequence owns exactly the pages its tokens need.
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1; got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free_pages: collections.deque[int] = collections.deque(range(num_pages))
        self._owners: dict[int, Sequence] = {}

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    def num_new_pages(self, seq: Sequence, num_new_tokens: int) -> int:
        """Pages `seq` needs beyond those it holds to store `num_new_tokens` more tokens of KV."""
        total = pages_needed(seq.num_computed_tokens + num_new_tokens, self.page_size)
        return max(0, total - len(seq.block_table))

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Gives `seq` the pages for `num_new_tokens` more tokens; False (and no change) if short."""
        needed = self.num_new_pages(seq, num_new_tokens)
        if needed > len(self._free_pages):
            return False
        for _ in range(needed):
            page = self._free_pages.popleft()
            self._owners[page] = seq
            seq.block_table.append(page)
        return True

    def free(self, seq: Sequence) -> None:
        """Returns all of `seq`'s pages to the free list."""
        for page in seq.block_table:
            del self._owners[page]
            self._free_pages.append(page)
        seq.block_table = []

    def check_invariants(self, live_seqs: list[Sequence]) -> None:
        free = set(self._free_pages)
        assert len(free) == len(self._free_pages), "a page is free twice"
        owned = [page for seq in live_seqs for page in seq.block_table]
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert not free & set(owned), "a page is both free and owned"
        assert len(free) + len(owned) == self.num_pages, "a page leaked"
        for seq in live_seqs:
            assert len(seq.block_table) >= pages_needed(seq.num_computed_tokens, self.page_size), \
                "a sequence has KV beyond its pages"
