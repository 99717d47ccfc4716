"""Several processes (hosts) running one model: JAX's own distributed runtime and collectives.

Every process starts the same command with `coordinator_address`, `num_processes` and its
`process_id` (EngineConfig's fields); `initialize` joins JAX's distributed runtime
(`jax.distributed.initialize`) before anything touches a device, after which `jax.devices()`
lists every process's devices and the engine's mesh spans them. Every process builds the same
engine and loads its own shards of the weights. Process 0, the coordinator, runs the
scheduler; its runner is a `LeaderRunner`, which sends each step's runner calls (the
scheduler's `SchedulerOutput` message, the dispatch, the fetches) to the other processes
through `jax.experimental.multihost_utils.broadcast_one_to_all` before launching the step
itself, so every process launches the same jitted programs in the same order. The others run
`follow`, which replays those calls on their own runner until the coordinator stops.

This module knows the runner only by the calls it forwards (prepare, dispatch, fetch,
reset_device_state, shutdown); it imports nothing from engine/ or runner/.
"""

from __future__ import annotations

import atexit
import logging
import pickle
import weakref
from typing import Any

import jax
import numpy as np

logger = logging.getLogger(__name__)

# Every message is one broadcast of this many bytes (its length, then the pickled calls); a
# longer one sends the rest in a second broadcast, padded to a power of two, so a few compiled
# broadcast programs serve every message.
_FIRST_BYTES = 4096
_LENGTH_BYTES = 4


def initialize(coordinator_address: str | None, num_processes: int, process_id: int) -> None:
    """Joins JAX's distributed runtime as process `process_id` of `num_processes` (nothing
    with one process). Idempotent; must run before the first use of a device. On CPU the
    processes' collectives go through gloo."""
    if num_processes <= 1 or jax.distributed.is_initialized():
        return
    # CPU devices need a cross-process collectives implementation (gloo is jax 0.11's default;
    # older versions had none); it does not affect accelerators.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    logger.info("process %d of %d joined %s: %d devices, %d of them here", process_id,
                num_processes, coordinator_address, jax.device_count(), jax.local_device_count())


def is_coordinator() -> bool:
    """Whether this process runs the scheduler (process 0; true without a distributed runtime)."""
    return jax.process_index() == 0


def local_device(devices: Any) -> jax.Device:
    """The first of `devices` (a mesh's, in order) that this process holds."""
    for device in np.asarray(devices).flat:
        if device.process_index == jax.process_index():
            return device
    raise ValueError(f"process {jax.process_index()} holds none of the devices {devices}")


def _send(ops: list[tuple]) -> None:
    """Broadcasts `ops` from the coordinator: the pickled bytes' length and their start in one
    broadcast of _FIRST_BYTES, the rest (if any) in a second, padded to a power of two."""
    from jax.experimental.multihost_utils import broadcast_one_to_all

    payload = pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL)
    data = np.frombuffer(len(payload).to_bytes(_LENGTH_BYTES, "little") + payload, np.uint8)
    first = np.zeros(_FIRST_BYTES, np.uint8)
    first[:min(len(data), _FIRST_BYTES)] = data[:_FIRST_BYTES]
    broadcast_one_to_all(first)
    if len(data) > _FIRST_BYTES:
        rest = np.zeros(_padded(len(data) - _FIRST_BYTES), np.uint8)
        rest[:len(data) - _FIRST_BYTES] = data[_FIRST_BYTES:]
        broadcast_one_to_all(rest)


def _receive() -> list[tuple]:
    """The ops the coordinator's next `_send` broadcasts."""
    from jax.experimental.multihost_utils import broadcast_one_to_all

    data = np.asarray(broadcast_one_to_all(np.zeros(_FIRST_BYTES, np.uint8))).tobytes()
    length = int.from_bytes(data[:_LENGTH_BYTES], "little")
    end = _LENGTH_BYTES + length
    if end > _FIRST_BYTES:
        rest = broadcast_one_to_all(np.zeros(_padded(end - _FIRST_BYTES), np.uint8))
        data += np.asarray(rest).tobytes()
    return pickle.loads(data[_LENGTH_BYTES:end])


def _padded(length: int) -> int:
    return 1 << (length - 1).bit_length()


class LeaderRunner:
    """The coordinator's runner: `runner`, whose step calls are also sent to the other
    processes. Calls that launch device programs (dispatch) first broadcast every call queued
    since the last broadcast, so each process launches the same programs in the same order
    (a collective launched out of order would wait forever); the others (prepare's message, a
    fetch, a reset) wait in the queue for the next. Every other attribute is the runner's."""

    def __init__(self, runner: Any):
        self._runner = runner
        self._queue: list[tuple] = []
        self._handles: dict[int, tuple[int, Any]] = {}  # id(handle) -> (number, handle)
        self._next_handle = 0
        # The stop message goes once: from `stop`/`shutdown`, when this runner is collected, or
        # at exit (registered after JAX's own exit hooks, so it runs before them). Neither hook
        # holds this runner, so dropping the engine still frees its device memory.
        self._send_stop = weakref.finalize(self, _send, [("stop",)])
        self._send_stop.atexit = False
        atexit.register(self._send_stop)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def _flush(self) -> None:
        ops, self._queue = self._queue, []
        _send(ops)

    def prepare(self, message: Any) -> Any:
        self._queue.append(("prepare", message))
        return self._runner.prepare(message)

    def dispatch(self, batch: Any, variant: Any) -> Any:
        number, self._next_handle = self._next_handle, self._next_handle + 1
        self._queue.append(("dispatch", number))
        self._flush()
        handle = self._runner.dispatch(batch, variant)
        self._handles[id(handle)] = (number, handle)
        return handle

    def fetch(self, handle: Any) -> Any:
        number, _ = self._handles.pop(id(handle), (None, None))
        if number is not None:  # (not a step from before a reset, which the others dropped)
            self._queue.append(("fetch", number))
        return self._runner.fetch(handle)

    def swap_out(self, pages: list[int]) -> Any:
        raise NotImplementedError("swap preemption is not supported across processes")

    def swap_in(self, pages: list[int], swapped: Any) -> None:
        raise NotImplementedError("swap preemption is not supported across processes")

    def reset_device_state(self) -> None:
        self._handles.clear()
        self._queue.append(("reset",))
        self._runner.reset_device_state()

    def stop(self) -> None:
        """Tells the other processes to stop following (once)."""
        self._queue = []
        self._send_stop()

    def shutdown(self) -> None:
        self.stop()
        self._runner.shutdown()


def follow(runner: Any) -> None:
    """A non-coordinator process's loop: replays the coordinator's runner calls on `runner`
    until it stops. A call that fails here fails as it did on the coordinator, whose engine
    recovers from it; it is logged and the loop goes on."""
    batch = variant = None
    handles: dict[int, Any] = {}
    while True:
        for op in _receive():
            kind = op[0]
            try:
                if kind == "stop":
                    return
                if kind == "prepare":
                    batch, variant = None, None
                    batch, variant = runner.prepare(op[1])
                elif kind == "dispatch":
                    if batch is not None:
                        handles[op[1]] = runner.dispatch(batch, variant)
                    batch = variant = None
                elif kind == "fetch":
                    if op[1] in handles:
                        runner.fetch(handles.pop(op[1]))
                elif kind == "reset":
                    handles.clear()
                    runner.reset_device_state()
                else:
                    raise ValueError(f"unknown runner call {kind!r}")
            except Exception:  # noqa: BLE001 - as on the coordinator, the next call goes on
                logger.exception("runner call %r failed on process %d", kind, jax.process_index())
