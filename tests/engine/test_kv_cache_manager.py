"""The block pool on its own: reference counts, the prefix cache, eviction order."""

import hashlib
import struct

from pjllm.engine.kv_cache_manager import KVCacheManager, hash_page
from pjllm.engine.sequence import Request, Sequence
from pjllm.sampling_params import SamplingParams

PAGE = 4


def _seq(seq_id: int, tokens: list[int], salt: str | None = None, **params) -> Sequence:
    request = Request(str(seq_id), None, list(tokens), SamplingParams(max_tokens=8, **params), (),
                      cache_salt=salt)
    seq = Sequence(seq_id, request, 0, 0, list(tokens), len(tokens), len(tokens) + 8)
    request.seqs.append(seq)
    return seq


def _admit(kv: KVCacheManager, seq: Sequence) -> int:
    """What the scheduler does for a waiting sequence: claim its cached prefix, then pages for
    the rest of its tokens; returns the cached token count."""
    seq.num_computed_tokens = kv.claim_cached_prefix(seq)
    assert kv.allocate_slots(seq, seq.num_tokens - seq.num_computed_tokens)
    return seq.num_computed_tokens


def test_page_hashes_are_sha256_chains_stable_across_processes():
    first = hash_page(b"", [1, 2, 3, 4])
    assert first == hashlib.sha256(struct.pack("<4i", 1, 2, 3, 4)).digest()
    assert first == hash_page(b"", [1, 2, 3, 4])
    assert hash_page(first, [5, 6, 7, 8]) != hash_page(b"", [5, 6, 7, 8])
    assert hash_page(b"", [1, 2, 3, 4], b"salt") != first


def test_a_second_sequence_shares_the_first_ones_full_pages():
    kv = KVCacheManager(num_pages=16, page_size=PAGE)
    shared = list(range(10, 22))  # three full pages
    a, b = _seq(0, shared + [1, 2]), _seq(1, shared + [3])
    assert _admit(kv, a) == 0
    assert _admit(kv, b) == 3 * PAGE
    assert kv.block_table(b)[:3] == kv.block_table(a)[:3]
    assert kv.block_table(b)[3] != kv.block_table(a)[3]
    assert [kv.ref_counts[p] for p in kv.block_table(a)] == [2, 2, 2, 1]
    assert kv.num_free_pages == 16 - 5
    kv.check_invariants([a, b])
    kv.free(a)
    kv.free(b)
    kv.check_invariants([])
    assert kv.num_free_pages == 16


def test_never_the_whole_prompt_nor_for_prompt_logprobs_nor_across_salts():
    kv = KVCacheManager(num_pages=32, page_size=PAGE)
    tokens = list(range(30, 38))  # exactly two pages
    _admit(kv, _seq(0, tokens))
    assert _admit(kv, _seq(1, tokens)) == PAGE  # its last token is computed
    assert _admit(kv, _seq(2, tokens + [9], prompt_logprobs=1)) == 0
    assert _admit(kv, _seq(3, tokens + [9], salt="a")) == 0
    assert _admit(kv, _seq(4, tokens + [9], salt="a")) == 2 * PAGE
    assert _admit(kv, _seq(5, tokens + [9], salt="b")) == 0


def test_freed_pages_stay_cached_until_evicted_least_recently_used_first():
    kv = KVCacheManager(num_pages=6, page_size=PAGE)
    old, new = _seq(0, list(range(100, 108)) + [0]), _seq(1, list(range(200, 208)) + [0])
    for seq in (old, new):
        _admit(kv, seq)  # two full pages (cached) and a partial one (not)
        kv.free(seq)
    assert kv.num_free_pages == 6
    # A 3-page newcomer takes the two uncached pages, then the least recently used cached one:
    # `old`'s, and of those its tail before its head.
    _admit(kv, _seq(2, list(range(300, 312))))
    probe = _seq(3, list(range(100, 108)) + [1])
    assert kv.claim_cached_prefix(probe) == PAGE
    kv.free(probe)
    assert kv.claim_cached_prefix(_seq(4, list(range(200, 208)) + [1])) == 2 * PAGE


def test_reset_forgets_prefixes_but_not_holders():
    kv = KVCacheManager(num_pages=8, page_size=PAGE)
    a = _seq(0, list(range(8)) + [99])
    _admit(kv, a)
    kv.reset_prefix_cache()
    b = _seq(1, list(range(8)) + [98])
    assert _admit(kv, b) == 0
    kv.check_invariants([a, b])
    assert all(kv.ref_counts[p] == 1 for p in kv.block_table(a))


def test_caching_off_shares_nothing():
    kv = KVCacheManager(num_pages=8, page_size=PAGE, enable_prefix_caching=False)
    tokens = list(range(9))
    _admit(kv, _seq(0, tokens))
    assert _admit(kv, _seq(1, tokens)) == 0
    assert kv.num_free_pages == 8 - 6


def test_a_sequence_that_comes_back_keeps_its_hashes_and_one_that_ends_does_not():
    kv = KVCacheManager(num_pages=8, page_size=PAGE)
    seq = _seq(0, list(range(12)) + [5])
    _admit(kv, seq)
    kv.free(seq, finished=False)  # preempted: back later, its tokens' hashes still good
    assert len(kv._seq_hashes[seq.seq_id]) == 3
    assert _admit(kv, seq) == 3 * PAGE
    kv.free(seq)
    assert seq.seq_id not in kv._seq_hashes


def test_pages_outside_a_sliding_window_are_given_back():
    """With every layer windowed (8 tokens), a sequence computing token p needs keys from
    p - 7 on: pages wholly before that go back to the pool (shared ones stay with their other
    holder), the invariants hold, and finishing frees the rest."""
    kv = KVCacheManager(num_pages=16, page_size=PAGE, sliding_window=8)
    prompt = list(range(10, 30))  # 20 tokens: 5 pages
    seq, other = _seq(0, prompt), _seq(1, prompt[:12] + [1])
    _admit(kv, seq)
    seq.num_computed_tokens = 20
    assert kv.num_free_pages == 11
    _admit(kv, other)  # shares the first 12 tokens' 3 pages; its token 12 sees keys 5..12
    assert kv.num_released_pages(other) == 1  # page 0, which seq still holds
    other.num_computed_tokens = 13
    assert kv.allocate_slots(seq, 1)  # token 20 sees keys 13..20: pages 0-2 go
    assert kv.num_released_pages(seq) == 3 and kv.held_pages(seq) == kv.block_table(seq)[3:]
    kv.check_invariants([seq, other])
    assert kv.num_free_pages == 16 - 6  # held: seq's pages 3-5; other's 1, 2 and its own
    kv.free(seq)
    kv.free(other)
    kv.check_invariants([])
    assert kv.num_free_pages == 16
