"""Compiled step programs, built when first needed or ahead of time in the background.

A step program is one XLA executable per (token bucket, step variant). Building one has two
parts: tracing and lowering (Python, holds the GIL) and XLA's compile (C++, releases it). The
background warmup lowers programs one after another on one thread and compiles each on a pool,
so the engine can serve while they build: a step whose program is not ready waits for that one
program only, and builds it at once if the warmup has not started on it.

With an `ExecutableStore` (runner/executable_store.py), a program stored by an earlier process
is loaded instead, neither traced nor lowered: the warmup thread hands it straight to the pool,
so loads run in parallel and never wait behind a lowering. A program built here is written to
the store afterwards, on a thread of its own, off the path of whoever waits for it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from typing import Callable, Hashable, Iterable

import jax

from pjllm.runner.executable_store import ExecutableStore

logger = logging.getLogger(__name__)


def _resolve(future: concurrent.futures.Future, result: object = None,
             error: BaseException | None = None) -> None:
    """Settles `future` unless `close` already did (a compile may finish after it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class ProgramCache:
    """Compiled programs by key; `lower(key)` returns the key's `jax.stages.Lowered`; `store`
    (optional) keeps them across processes."""

    def __init__(self, lower: Callable[[Hashable], jax.stages.Lowered],
                 max_compile_threads: int | None = None, describe: Callable[[Hashable], str] = str,
                 store: ExecutableStore | None = None):
        self._lower = lower
        self._describe = describe  # a key as logs name it
        self.store = store  # where programs are loaded from and kept for the next process
        # How each program came to be: "loaded" from the store, or lowered and "compiled" here
        # (where JAX's compilation cache may have spared XLA's compile).
        self.build_counts = {"loaded": 0, "compiled": 0}
        self._futures: dict[Hashable, concurrent.futures.Future] = {}
        # Reentrant: the runner's finalizer (close) may run in a garbage collection that starts
        # inside a locked region of the thread that dropped the last reference.
        self._lock = threading.RLock()
        # Kept open: at interpreter exit its workers finish the compile in hand and drop the rest.
        self._compile_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_compile_threads or min(8, os.cpu_count() or 1),
            thread_name_prefix="pjllm-compile")
        # Programs are written to the store one at a time, after whoever waits for them has
        # them; `close` leaves the writes queued to finish (each holds its executable till then).
        self._store_pool = (concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="pjllm-store") if store is not None else None)
        self._store_writes: list[concurrent.futures.Future] = []
        self._warmup_thread: threading.Thread | None = None
        self._warmup_futures: list[concurrent.futures.Future] = []
        # Builds queued on the pool and not started yet: (pool job, lowered program or None).
        self._queued: dict[Hashable, tuple[concurrent.futures.Future,
                                           jax.stages.Lowered | None]] = {}
        self._closed = threading.Event()
        self.warmup_timings: dict[str, float] = {}

    def _claim(self, key: Hashable) -> tuple[concurrent.futures.Future, bool]:
        """The key's future, and whether the caller just created it (and so must build it)."""
        with self._lock:
            future = self._futures.get(key)
            if future is not None:
                return future, False
            future = self._futures[key] = concurrent.futures.Future()
            return future, True

    def get(self, key: Hashable) -> jax.stages.Compiled:
        """The compiled program of `key`, built in this thread if nobody has started it.

        A build that failed (or was interrupted) is not kept: the next `get` builds it again."""
        future, owner = self._claim(key)
        if future.done() and not owner:
            return self._result(key, future)
        start = time.perf_counter()
        if owner:
            how = self._build(key, future)
        else:
            # A program the warmup queued but has not started (a load from the store, above all,
            # which the warmup queues all at once) is built here, rather than after those
            # ahead of it.
            taken, lowered = self._take_back(key)
            how = (self._build(key, future, lowered) + " ahead of the warmup" if taken
                   else "the warmup built it")
        result = self._result(key, future)
        logger.info("waited %.1f s for the step program %s (%s)", time.perf_counter() - start,
                    self._describe(key), how)
        return result

    def _build(self, key: Hashable, future: concurrent.futures.Future,
               lowered: jax.stages.Lowered | None = None) -> str:
        """Settles `future` with `key`'s program: loaded from the store, or else compiled (from
        `lowered`, or lowered here first) and then queued for the store. Returns how it was
        built, for logs."""
        try:
            if lowered is None:
                compiled = self.store.load(key) if self.store is not None else None
                if compiled is not None:
                    self._count("loaded")
                    _resolve(future, result=compiled)
                    return "loaded it"
                lowered = self._lower(key)
            if self.store is not None:
                compiled, storable = self.store.compile(lowered)
            else:
                compiled, storable = lowered.compile(), False
        except BaseException as error:  # kept for whoever waits on the program
            _resolve(future, error=error)
            return "failed"
        self._count("compiled")
        if storable and self._store_pool is not None:  # queued first: see wait_for_store_writes
            try:
                self._store_writes.append(self._store_pool.submit(self.store.save, key, compiled))
            except RuntimeError:  # closed, or the interpreter is exiting: not stored
                pass
        _resolve(future, result=compiled)
        return "compiled it"

    def _count(self, how: str) -> None:
        with self._lock:
            self.build_counts[how] += 1

    def _result(self, key: Hashable, future: concurrent.futures.Future) -> jax.stages.Compiled:
        try:
            return future.result()
        except BaseException:
            with self._lock:
                if self._futures.get(key) is future:
                    del self._futures[key]
            raise

    def lower(self, key: Hashable) -> jax.stages.Lowered:
        """The key's program, traced and lowered (not compiled): e.g. to read its StableHLO."""
        return self._lower(key)

    def __len__(self) -> int:
        """Programs built or being built."""
        return len(self._futures)

    def keys(self) -> list[Hashable]:
        """The keys built or being built."""
        with self._lock:
            return list(self._futures)

    def is_available(self, key: Hashable) -> bool:
        """Whether using `key` now waits for nothing that a warmup is meant to spare: it is
        built, or no warmup was started (then every program compiles on first use)."""
        return self._warmup_thread is None or self.is_ready(key)

    def is_ready(self, key: Hashable) -> bool:
        future = self._futures.get(key)
        return future is not None and future.done()

    def warm(self, keys: Iterable[Hashable]) -> None:
        """Starts building `keys` (in order) on a background thread; returns at once."""
        keys = list(keys)
        self._warmup_thread = threading.Thread(target=self._build_all, args=(keys,),
                                               name="pjllm-warmup", daemon=True)
        self._warmup_thread.start()

    def _build_all(self, keys: list[Hashable]) -> None:
        start = time.perf_counter()
        lower_s = 0.0
        for key in keys:
            if self._closed.is_set():
                return
            future, owner = self._claim(key)
            self._warmup_futures.append(future)
            if not owner:
                continue
            if self._is_stored(key):
                # Loaded (or, if its file turns out unusable, built) on the pool: this thread
                # goes on to the next program at once.
                self._queue(key, future)
                continue
            lower_start = time.perf_counter()
            try:
                lowered = self._lower(key)
            except BaseException as error:
                _resolve(future, error=error)
                continue
            lower_s += time.perf_counter() - lower_start
            self._queue(key, future, lowered)
        concurrent.futures.wait(self._warmup_futures)
        self.warmup_timings = {"lower_s": lower_s, "compile_s": time.perf_counter() - start}
        logger.info("built %d step programs in %.1f s (%.1f s tracing and lowering; %d loaded "
                    "from the store)", len(keys), self.warmup_timings["compile_s"], lower_s,
                    self.build_counts["loaded"])

    def _is_stored(self, key: Hashable) -> bool:
        """Whether the store has a file for `key` (False for a key it cannot even name: then
        lowering it raises the same error, for the program's waiters)."""
        try:
            return self.store is not None and self.store.contains(key)
        except Exception:
            return False

    def _queue(self, key: Hashable, future: concurrent.futures.Future,
               lowered: jax.stages.Lowered | None = None) -> None:
        """Queues the build of `key` (`_build`, which settles `future`) on the compile pool,
        where a `get` that needs it before its turn may take it back."""
        try:
            job = self._compile_pool.submit(self._build_queued, key, future, lowered)
        except RuntimeError as error:  # closed, or the interpreter is exiting
            _resolve(future, error=error)
            return
        with self._lock:
            if not job.done():
                self._queued[key] = (job, lowered)

    def _build_queued(self, key: Hashable, future: concurrent.futures.Future,
                      lowered: jax.stages.Lowered | None) -> None:
        with self._lock:
            self._queued.pop(key, None)
        self._build(key, future, lowered)

    def _take_back(self, key: Hashable) -> tuple[bool, jax.stages.Lowered | None]:
        """Whether `key`'s queued build was taken off the pool before it started (the caller
        must then build it), and what it was to build from."""
        with self._lock:
            queued = self._queued.pop(key, None)
        if queued is None or not queued[0].cancel():
            return False, None
        return True, queued[1]

    def close(self, wait: bool = True) -> None:
        """Stops the warmup after the program it is lowering (waiting for that when `wait`),
        drops queued compiles and every built program; a compile already running finishes in
        the background and is dropped."""
        self._closed.set()
        self._compile_pool.shutdown(wait=False, cancel_futures=True)
        if self._store_pool is not None:
            self._store_pool.shutdown(wait=False)
        with self._lock:  # settles what the warmup thread may be waiting for
            for future in self._futures.values():
                _resolve(future, error=RuntimeError("the program cache was closed"))
            self._futures.clear()
            self._queued.clear()
        if wait and self._warmup_thread is not None:
            self._warmup_thread.join()
        self._warmup_futures = []

    def wait_for_store_writes(self) -> None:
        """Blocks until every program built so far (every settled `get` or warmup) is written
        to the store."""
        concurrent.futures.wait(list(self._store_writes))

    def wait_for_warmup(self) -> dict[str, float]:
        """Blocks until every program of `warm` is built; raises the first build error.
        Returns {"lower_s", "compile_s"} of the warmup ({} if none ran)."""
        if self._warmup_thread is None:
            return {}
        self._warmup_thread.join()
        for future in self._warmup_futures:
            future.result()
        return self.warmup_timings
