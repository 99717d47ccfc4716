"""ProgramCache: each program is built once, whoever asks first; the warmup runs in the background."""

import threading

import pytest

from pjllm.runner.programs import ProgramCache


class _Lowered:
    def __init__(self, key, gate: threading.Event | None, compiles: list):
        self.key, self.gate, self.compiles = key, gate, compiles

    def compile(self):
        if self.gate is not None:
            self.gate.wait(timeout=10)
        if self.key == "bad":
            raise ValueError("no such program")
        self.compiles.append(self.key)
        return f"program {self.key}"


def _cache(gate=None):
    lowered, compiles = [], []

    def lower(key):
        lowered.append(key)
        return _Lowered(key, gate, compiles)

    return ProgramCache(lower, max_compile_threads=2), lowered, compiles


def test_get_builds_once_and_reuses():
    cache, lowered, compiles = _cache()
    assert cache.get(16) == "program 16" and cache.get(16) == "program 16"
    assert lowered == [16] and compiles == [16]
    assert cache.is_ready(16) and not cache.is_ready(32)
    assert cache.wait_for_warmup() == {}  # no warmup ran


def test_warmup_in_background_shares_programs_with_get():
    gate = threading.Event()
    cache, lowered, compiles = _cache(gate)
    cache.warm([16, 32, 64])
    waiter = threading.Thread(target=lambda: results.append(cache.get(32)))
    results = []
    waiter.start()
    assert not cache.is_ready(32)  # every compile is held at the gate
    gate.set()
    waiter.join(timeout=10)
    timings = cache.wait_for_warmup()
    assert results == ["program 32"]
    assert sorted(lowered) == [16, 32, 64] and sorted(compiles) == [16, 32, 64]  # none twice
    assert set(timings) == {"lower_s", "compile_s"} and timings["compile_s"] >= timings["lower_s"]


def test_build_errors_reach_every_waiter():
    cache, _, _ = _cache()
    cache.warm(["bad", 16])
    with pytest.raises(ValueError, match="no such program"):
        cache.wait_for_warmup()
    with pytest.raises(ValueError, match="no such program"):
        cache.get("bad")
    assert cache.get(16) == "program 16"


def test_a_failed_or_interrupted_build_is_built_again():
    """A Ctrl-C during a first compile must not break that program for good."""
    attempts = []

    def lower(key):
        attempts.append(key)
        if len(attempts) == 1:
            raise KeyboardInterrupt
        return _Lowered(key, None, [])

    cache = ProgramCache(lower, max_compile_threads=1)
    with pytest.raises(KeyboardInterrupt):
        cache.get(16)
    assert cache.get(16) == "program 16" and attempts == [16, 16]


def test_close_stops_the_warmup_and_drops_every_program():
    gate = threading.Event()  # never set: every compile waits, so the warmup cannot finish
    lowered = []

    def lower(key):
        # Lowering costs nothing here, so the warmup could lower every key before `close` runs;
        # from the second key on it waits (at most 10 s) for `close` to begin.
        if lowered:
            cache._closed.wait(timeout=10)
        lowered.append(key)
        return _Lowered(key, gate, [])

    cache = ProgramCache(lower, max_compile_threads=2)
    keys = list(range(16, 16 * 40, 16))
    cache.warm(keys)
    cache.close()  # settles what the warmup waits for, then joins its thread
    assert not cache._warmup_thread.is_alive()
    assert len(cache) == 0 and len(lowered) < len(keys)


class _Store:
    """An in-memory stand-in for ExecutableStore: what `load` returns for each stored key."""

    def __init__(self, stored: dict, unusable: tuple = (), unstorable: tuple = ()):
        self.stored, self.unusable = dict(stored), set(unusable)  # unusable: listed, fails to load
        self.unstorable = set(unstorable)  # compiled into something that must not be stored
        self.loads = []

    def compile(self, lowered):
        return lowered.compile(), lowered.key not in self.unstorable

    def contains(self, key):
        return key in self.stored or key in self.unusable

    def load(self, key):
        self.loads.append(key)
        return self.stored.get(key)

    def save(self, key, compiled):
        self.stored[key] = compiled


def test_stored_programs_are_loaded_not_lowered_and_built_ones_are_stored():
    lowered, compiles = [], []

    def lower(key):
        lowered.append(key)
        return _Lowered(key, None, compiles)

    store = _Store({16: "stored 16", 32: "stored 32"}, unusable=[64])
    cache = ProgramCache(lower, max_compile_threads=2, store=store)
    cache.warm([16, 32, 64, 128])
    cache.wait_for_warmup()
    assert [cache.get(key) for key in (16, 32, 64, 128)] == [
        "stored 16", "stored 32", "program 64", "program 128"]
    # The unusable entry (64) is built on the pool after its load failed; only 128 was lowered by
    # the warmup thread itself.
    assert sorted(lowered) == [64, 128] and sorted(store.loads) == [16, 32, 64]
    assert cache.build_counts == {"loaded": 2, "compiled": 2}
    cache.wait_for_store_writes()
    assert store.stored[64] == "program 64" and store.stored[128] == "program 128"


def test_get_loads_a_stored_program_and_stores_the_one_it_compiles():
    lowered = []

    def lower(key):
        lowered.append(key)
        return _Lowered(key, None, [])

    store = _Store({16: "stored 16"})
    cache = ProgramCache(lower, max_compile_threads=1, store=store)
    assert cache.get(16) == "stored 16" and lowered == []
    assert cache.get(32) == "program 32" and lowered == [32]
    cache.wait_for_store_writes()  # written on a thread of its own
    assert store.stored[32] == "program 32"
    assert cache.build_counts == {"loaded": 1, "compiled": 1}


def test_a_program_the_store_cannot_keep_is_not_stored():
    store = _Store({}, unstorable=[16])
    cache = ProgramCache(lambda key: _Lowered(key, None, []), max_compile_threads=1, store=store)
    assert cache.get(16) == "program 16" and cache.get(32) == "program 32"
    cache.wait_for_store_writes()
    assert list(store.stored) == [32]


def test_get_builds_a_program_the_warmup_queued_but_did_not_start():
    """A step waiting for one program does not wait for the warmup's queue ahead of it."""
    gate, compiles = threading.Event(), []

    def lower(key):
        return _Lowered(key, gate if key == 16 else None, compiles)

    cache = ProgramCache(lower, max_compile_threads=1)
    cache.warm([16, 32, 64])  # 16 holds the only compile thread until the gate opens
    assert cache.get(64) == "program 64"
    assert not cache.is_ready(16)
    gate.set()
    cache.wait_for_warmup()
    assert sorted(compiles) == [16, 32, 64]  # 64 once, in this thread
