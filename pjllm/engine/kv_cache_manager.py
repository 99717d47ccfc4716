"""The KV block pool: pages with reference counts, each sequence's block table, and the prefix
cache over them. Plain Python, no JAX.

A page is held (reference count > 0) by the sequences whose block tables name it, or free. A
full page whose tokens are known carries a hash that chains its parent page's hash, its token ids
and the request's extra keys (its `cache_salt`), so equal hashes mean equal prefixes. A new
sequence starts from the longest run of cached pages that matches its tokens and computes only
the rest. Freed pages keep their hash and stay findable until a page is needed and they are the
least recently used free page.

With a `sliding_window` (every layer of the model windowed), a sequence gives back the pages
wholly before the window of the tokens it computes next: its block table keeps their ids (the
attention kernels never read them), but it no longer holds them.
"""

from __future__ import annotations

import collections
import hashlib
import struct

from pjllm.engine.sequence import Sequence


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def hash_page(parent: bytes, token_ids: list[int], extra_keys: bytes = b"") -> bytes:
    """sha256 of (parent page's hash, this page's token ids as little-endian int32, extra keys):
    the same in every process and on every host."""
    digest = hashlib.sha256(parent)
    digest.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    digest.update(extra_keys)
    return digest.digest()


class KVCacheManager:
    """Hands out pages of the global KV page arrays to sequences, shares cached ones, and takes
    them back.

    Invariants (`check_invariants`, used by the property tests): reference counts are >= 0 and
    equal the number of block tables naming the page; a page is free exactly when its count is
    0, and on the free list once; a cached hash names a page carrying that hash; a sequence owns
    the pages its computed tokens need.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1; got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.ref_counts = [0] * num_pages
        self._page_hashes: list[bytes | None] = [None] * num_pages
        # Pages no sequence holds, least recently used first: taken from the front. Pages that
        # hold nothing reusable go to the front, cached ones to the back.
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(
            range(num_pages))
        self._cached: dict[bytes, int] = {}
        self._tables: dict[int, list[int]] = {}
        # seq_id -> how many leading pages of its table it gave back (outside its window).
        self._released: dict[int, int] = {}
        # seq_id -> the chained hashes of its full pages whose tokens are known, in order, and
        # how many of its pages are cached already (or were looked at for caching).
        self._seq_hashes: dict[int, list[bytes]] = {}
        self._num_pages_cached: dict[int, int] = {}
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_pages(self) -> int:
        """Pages no sequence holds, cached or not."""
        return len(self._free)

    def block_table(self, seq: Sequence) -> list[int]:
        """`seq`'s pages in order (the pool's list: read it, do not change it); the first
        `num_released_pages(seq)` are given back and may hold other sequences' KV."""
        return self._tables.get(seq.seq_id, [])

    def num_released_pages(self, seq: Sequence) -> int:
        """Leading pages of `seq`'s table given back, as outside its sliding window."""
        return self._released.get(seq.seq_id, 0)

    def held_pages(self, seq: Sequence) -> list[int]:
        """The pages `seq` holds: its table past those given back."""
        return self.block_table(seq)[self.num_released_pages(seq):]

    def num_new_pages(self, seq: Sequence, num_new_tokens: int) -> int:
        """Pages `seq` needs beyond those it holds to store `num_new_tokens` more tokens of KV."""
        total = pages_needed(seq.num_computed_tokens + num_new_tokens, self.page_size)
        return max(0, total - len(self.block_table(seq)))

    def claim_cached_prefix(self, seq: Sequence) -> int:
        """For a sequence holding no pages: takes the cached pages that match its leading
        tokens and returns how many tokens they hold (a multiple of the page size, and less than
        its tokens: the last one is always computed, as its logits sample). 0 when caching is
        off or the request wants prompt logprobs (those need the prompt's logits)."""
        assert not self.block_table(seq), f"sequence {seq.seq_id} already holds pages"
        if not self.enable_prefix_caching:
            return 0
        hashes = self._hashes(seq, seq.num_resolved_tokens)
        pages = []
        if seq.params.prompt_logprobs is None:
            for page_hash in hashes:
                page = self._cached.get(page_hash)
                if page is None:
                    break
                pages.append(page)
        if pages and len(pages) * self.page_size >= seq.num_tokens:
            pages.pop()
        for page in pages:
            self._take(page)
        self._tables[seq.seq_id] = pages
        self._num_pages_cached[seq.seq_id] = len(pages)
        return len(pages) * self.page_size

    def count_prefix_lookup(self, num_tokens: int, num_cached_tokens: int) -> None:
        """Counts a sequence admitted with `num_cached_tokens` of its `num_tokens` cached (the
        prefix_cache_queries and prefix_cache_hits metrics, in tokens)."""
        if self.enable_prefix_caching:
            self.num_queried_tokens += num_tokens
            self.num_hit_tokens += num_cached_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Gives `seq` the pages for `num_new_tokens` more tokens, and caches the pages that
        those tokens fill; False (and no change) if short of free pages."""
        self._release_outside_window(seq)
        needed = self.num_new_pages(seq, num_new_tokens)
        if needed > len(self._free):
            return False
        table = self._tables.setdefault(seq.seq_id, [])
        for _ in range(needed):
            page = next(iter(self._free))
            self._uncache(page)
            self._take(page)
            table.append(page)
        if self.enable_prefix_caching:
            self._cache_full_pages(seq, seq.num_computed_tokens + num_new_tokens)
        return True

    def _release_outside_window(self, seq: Sequence) -> None:
        """Gives back `seq`'s pages that hold only keys before the window of its next token
        (position num_computed_tokens sees keys from num_computed_tokens - window + 1 on). A
        step in flight may still read them: a page's next owner writes it in a later step."""
        if self.sliding_window is None:
            return
        first_key = seq.num_computed_tokens - self.sliding_window + 1
        outside = min(max(first_key, 0) // self.page_size, len(self.block_table(seq)))
        released = self.num_released_pages(seq)
        if outside <= released:
            return
        table = self._tables[seq.seq_id]
        self._drop(table[released:outside])
        self._released[seq.seq_id] = outside
        # Pages given back before they were cached stay uncached: their ids may be reused.
        self._num_pages_cached[seq.seq_id] = max(self._num_pages_cached.get(seq.seq_id, 0),
                                                 outside)

    def _drop(self, pages: list[int]) -> None:
        """One hold less on each of `pages`, the last first (see `free`)."""
        for page in reversed(pages):
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                self._free[page] = None
                if self._page_hashes[page] is None:
                    self._free.move_to_end(page, last=False)

    def free(self, seq: Sequence, finished: bool = True) -> None:
        """Drops `seq`'s hold on its pages. A page no one else holds becomes free; one with a
        hash stays cached, the sequence's later pages ahead of its earlier ones in eviction
        order (a shared prefix outlives the tails that branch from it). A sequence that will
        come back (`finished=False`: preempted, or not admitted after all) keeps its page
        hashes, so its next lookup hashes only tokens that are new."""
        table = self._tables.pop(seq.seq_id, [])
        released = self._released.pop(seq.seq_id, 0)
        if finished:
            self._seq_hashes.pop(seq.seq_id, None)
        self._num_pages_cached.pop(seq.seq_id, None)
        self._drop(table[released:])

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (after the KV cache was rebuilt, or a step that filled
        pages may not have run). Pages stay where they are; only their hashes go."""
        self._cached.clear()
        self._page_hashes = [None] * self.num_pages
        self._num_pages_cached.clear()

    def _take(self, page: int) -> None:
        """One more hold on `page`; a free page leaves the free list."""
        if self.ref_counts[page] == 0:
            del self._free[page]
        self.ref_counts[page] += 1

    def _uncache(self, page: int) -> None:
        """Evicts a free page's prefix: its KV is about to be overwritten."""
        page_hash = self._page_hashes[page]
        if page_hash is not None:
            self._page_hashes[page] = None
            del self._cached[page_hash]

    def _hashes(self, seq: Sequence, num_tokens: int) -> list[bytes]:
        """The chained hashes of `seq`'s full pages among its first `num_tokens` tokens (each
        computed once per sequence)."""
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        size = self.page_size
        for index in range(len(hashes), num_tokens // size):
            parent = hashes[-1] if hashes else b""
            extra = seq.request.cache_salt.encode() if index == 0 and seq.request.cache_salt else b""
            hashes.append(hash_page(parent, seq.token_ids[index * size:(index + 1) * size], extra))
        return hashes[:num_tokens // size]

    def _cache_full_pages(self, seq: Sequence, num_computed: int) -> None:
        """Caches `seq`'s pages that are full once `num_computed` tokens are, as far as their
        token ids are known (with async scheduling the newest may still be on the device)."""
        done = self._num_pages_cached.get(seq.seq_id, 0)
        known = min(num_computed, seq.num_resolved_tokens)
        if known // self.page_size <= done:
            return
        table = self._tables[seq.seq_id]
        hashes = self._hashes(seq, known)
        for index in range(done, len(hashes)):
            page, page_hash = table[index], hashes[index]
            # A prefix computed twice at once (or a page claimed from the cache): the copy
            # cached first stays the one found.
            if self._page_hashes[page] is None and page_hash not in self._cached:
                self._page_hashes[page] = page_hash
                self._cached[page_hash] = page
        self._num_pages_cached[seq.seq_id] = len(hashes)

    def check_invariants(self, live_seqs: list[Sequence]) -> None:
        counts = [0] * self.num_pages
        for seq in live_seqs:
            for page in self.held_pages(seq):
                counts[page] += 1
        assert set(self._tables) <= {seq.seq_id for seq in live_seqs}, "a dead sequence holds pages"
        assert counts == self.ref_counts, "a reference count is off"
        free = [page for page in range(self.num_pages) if counts[page] == 0]
        assert sorted(self._free) == free, "the free list is not the unheld pages"
        for page_hash, page in self._cached.items():
            assert self._page_hashes[page] == page_hash, "a cached hash names the wrong page"
        for seq in live_seqs:
            assert len(self.block_table(seq)) >= pages_needed(seq.num_computed_tokens, self.page_size), \
                "a sequence has KV beyond its pages"
