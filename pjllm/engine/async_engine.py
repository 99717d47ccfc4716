"""The engine for asyncio code (the server): the step loop in its own process, callers await
outputs.

`AsyncLLM.generate(prompt, params, request_id)` is an async iterator of `RequestOutput`s (each the
request's state so far, like `LLM.generate`'s; the last has `finished=True`). Many callers share
one continuous batch. The engine core (`LLMEngine`) runs in a child process
(`engine/core_process.py`), so HTTP work in this process never holds the GIL its steps need:
with the loop in a thread of the server's process, an H200 served 60% of the offline rate
(docs/perf.md). Here, prompts are checked and tokenized (`InputProcessor`) before they are sent;
a reader thread receives each step's deltas, rebuilds the outputs and hands them to the callers'
event loops, one wake-up per loop per step.

With `data_parallel_size` D > 1 there are D core processes, replica i on its own devices
(`sharding.replica_devices`); each request goes to the replica with the fewest outstanding
requests (`engine/router.py`), its aborts and stop-string finishes to that replica, and each
core has its own pipes and reader thread. What the cores report (running, waiting, KV use,
preemptions, prefix cache counts) is combined for the metrics and the log line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
from typing import Any, AsyncIterator, Callable

from pjllm.config import EngineConfig
from pjllm.engine.core_process import CoreStats, OutputAccumulator, RequestDelta, run_engine_core
from pjllm.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from pjllm.engine.router import ReplicaRouter
from pjllm.outputs import RequestOutput
from pjllm.sampling_params import SamplingParams

logger = logging.getLogger("pjllm")


class EngineDeadError(RuntimeError):
    """The engine core has stopped (it failed, or the engine was shut down): no request can run."""


class EngineOverloadedError(RuntimeError):
    """More requests are waiting than `max_waiting_requests` allows; try again later."""


@dataclasses.dataclass
class IterationStats:
    """What one engine step did, for metrics and the periodic log line (times: time.monotonic()).

    prompt_tokens:     prompt tokens of requests whose first token arrived in this step
    generation_tokens: tokens generated in this step, over all requests
    time_to_first_token, inter_token_latency: seconds, one entry per token that arrived
    finished:          (finish_reason, e2e seconds, queue seconds, prompt tokens, output tokens)
                       of each request that finished
    """

    time: float
    prompt_tokens: int = 0
    generation_tokens: int = 0
    time_to_first_token: list[float] = dataclasses.field(default_factory=list)
    inter_token_latency: list[float] = dataclasses.field(default_factory=list)
    finished: list[tuple[str, float, float, int, int]] = dataclasses.field(default_factory=list)


class _Core:
    """The front end's side of one engine core process (one data-parallel replica): the
    process, its pipes, its reader thread, and what the front end knows of its queue."""

    def __init__(self, context: Any, config: EngineConfig, replica: int):
        self.replica = replica
        core_commands, self.commands = context.Pipe(duplex=False)  # (receiving end, sending end)
        self.results, core_results = context.Pipe(duplex=False)
        _enlarge_pipe(self.results)
        self.process = context.Process(target=run_engine_core,
                                       args=(config, replica, core_commands, core_results),
                                       name=f"pjllm-engine-core-{replica}", daemon=True)
        self.process.start()
        core_commands.close()
        core_results.close()
        self.stats = CoreStats(0, 0, 0.0, 0)  # as of its last step
        self.num_unseen_adds = 0  # adds sent since it last reported its queue
        self.reader: threading.Thread | None = None

    def wait_ready(self) -> str | None:
        """Waits until the core has loaded the model: None, or why it failed to."""
        ready = self.receive()
        if ready is not None and ready[0] == "ready":
            return None
        self.process.join(30)
        return ready[1] if ready else f"exit code {self.process.exitcode}"

    def send(self, command: tuple) -> None:
        try:
            self.commands.send(command)
        except (BrokenPipeError, OSError):
            pass  # the core is gone; its reader fails its callers

    def receive(self) -> tuple | None:
        try:
            return self.results.recv()
        except (EOFError, OSError):
            return None

    def join(self, timeout: float) -> None:
        """Waits for the process to exit (after "stop"), killing it after `timeout` seconds."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


@dataclasses.dataclass(eq=False)
class _Stream:
    """One caller's request: where its outputs go, which core runs it, and how far it has got."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    arrival_time: float
    core: _Core
    num_tokens: int = 0
    last_token_time: float | None = None
    abandoned: bool = False  # its caller went away: count its end, deliver nothing
    done: bool = False  # its final output went out before the core finished it (stop string)


class AsyncLLM:
    """An `LLMEngine` in its own process, served to asyncio callers.

    >>> engine = AsyncLLM("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> async for output in engine.generate("Hello", SamplingParams(max_tokens=8), "req-1"):
    ...     print(output.outputs[0].text)

    Keyword arguments are `EngineConfig` fields, as for `LLM` (`data_parallel_size`: that many
    engine core processes). `max_waiting_requests` bounds the requests that wait for a place in
    the batch, over all replicas (None: unbounded); past it `generate` raises
    `EngineOverloadedError`. `on_iteration` is called on a reader thread after every step of
    any replica. The constructor returns once every engine core has loaded the model (their
    errors are raised here as RuntimeError).
    """

    def __init__(self, model: str, *, max_waiting_requests: int | None = None,
                 on_iteration: Callable[[IterationStats], None] | None = None, **engine_kwargs: Any):
        config = EngineConfig.from_kwargs(model, **engine_kwargs)
        self.inputs = InputProcessor(config)
        self.max_waiting_requests = max_waiting_requests
        self.on_iteration = on_iteration
        self.dead_error: BaseException | None = None
        self._streams: dict[str, _Stream] = {}
        self._accumulator = OutputAccumulator(self.inputs.tokenizer)
        # _streams, the router, each core's num_unseen_adds and stats, and sends on the pipes.
        self._lock = threading.Lock()
        self._router = ReplicaRouter(config.data_parallel_size, config.seed)
        # spawn, not fork: the parent may have started JAX, which must not be forked. All the
        # cores load at once.
        context = multiprocessing.get_context("spawn")
        self._cores = [_Core(context, config, replica)
                       for replica in range(config.data_parallel_size)]
        failures = [failure for core in self._cores if (failure := core.wait_ready()) is not None]
        if failures:
            for core in self._cores:
                core.send(("stop",))
            for core in self._cores:
                core.join(30)
            raise RuntimeError("the engine core failed to start: " + failures[0])
        for core in self._cores:
            core.reader = threading.Thread(target=self._read, args=(core,), daemon=True,
                                           name=f"pjllm-engine-reader-{core.replica}")
            core.reader.start()

    # ------------------------------------------------------------------ what the model takes
    @property
    def tokenizer(self) -> Any:
        return self.inputs.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.inputs.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.inputs.model_config.vocab_size

    def default_sampling_params(self) -> SamplingParams:
        return self.inputs.default_sampling_params()

    def process_prompt(self, prompt: PromptType, params: SamplingParams) -> ProcessedPrompt:
        """Checks a request and tokenizes its prompt, on the caller's thread (ValueError names
        the field)."""
        return self.inputs.process_prompt(prompt, params)

    # ------------------------------------------------------------------ caller side
    @property
    def is_running(self) -> bool:
        """Whether every engine core is alive and takes requests."""
        return self.dead_error is None and all(core.process.is_alive() for core in self._cores)

    @property
    def stats(self) -> CoreStats:
        """The cores' last reports, combined (`CoreStats.combine`)."""
        return CoreStats.combine([core.stats for core in self._cores])

    def num_waiting_requests(self) -> int:
        """Sequences waiting for a place in a batch, plus requests sent since their core's last
        report."""
        return sum(core.stats.num_waiting + core.num_unseen_adds for core in self._cores)

    def num_running_requests(self) -> int:
        return self.stats.num_running

    def kv_cache_usage(self) -> float:
        """The share of KV cache pages in use, in [0, 1] (the replicas' mean)."""
        return self.stats.kv_cache_usage

    async def generate(self, prompt: PromptType, params: SamplingParams | None,
                       request_id: str, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Adds a request and yields its state each time it has new tokens; the last output has
        `finished=True`. Raises ValueError for a request that cannot run (before any output),
        EngineOverloadedError when too many wait, EngineDeadError when the core has stopped.
        Closing the iterator early (a cancelled task, a `break`) aborts the request."""
        if not self.is_running:
            raise EngineDeadError("the engine core is not running") from self.dead_error
        if self.max_waiting_requests is not None and self.num_waiting_requests() >= self.max_waiting_requests:
            raise EngineOverloadedError(f"{self.num_waiting_requests()} requests are waiting "
                                        f"(max_waiting_requests {self.max_waiting_requests})")
        params = params if params is not None else self.default_sampling_params()
        processed = self.process_prompt(prompt, params)
        self.inputs.check_priority(priority)
        text, token_ids = processed.text, processed.token_ids
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            # Seeds drawn here, in arrival order, whichever replica runs the request.
            params = self._router.seeded(params)
            core = self._cores[self._router.route()]
            stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic(), core)
            self._streams[request_id] = stream
            self._accumulator.start(request_id, text, token_ids, params)
            core.num_unseen_adds += 1
            core.send(("add", request_id, processed.as_dict(), params, priority))
        finished = False
        try:
            while not finished:
                item = await stream.outputs.get()
                # Only the latest state matters: skip outputs a slow caller has not read yet.
                while not stream.outputs.empty() and not isinstance(item, BaseException):
                    item = stream.outputs.get_nowait()
                if isinstance(item, BaseException):  # the core refused it, or died
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._abort_own(request_id, stream)

    def abort(self, request_id: str) -> None:
        """Stops a request and frees its pages (no-op for an unknown or finished id); its caller
        gets a final output with finish reason "abort"."""
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.core.send(("abort", request_id))

    def _abort_own(self, request_id: str, stream: _Stream) -> None:
        """Aborts the caller's own request only: once it finished, the id may be someone else's.
        The stream stays registered (and the id in use) until the core reports the abort."""
        with self._lock:
            if self._streams.get(request_id) is stream and not stream.done:
                stream.abandoned = True
                stream.core.send(("abort", request_id))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Aborts every request (callers get their final output, finish reason "abort"), stops the
        engine cores (freeing their device memory) and the reader threads."""
        with self._lock:
            for request_id, stream in self._streams.items():
                stream.core.send(("abort", request_id))
            for core in self._cores:
                core.send(("stop",))
        for core in self._cores:
            core.join(timeout)
        for core in self._cores:
            core.reader.join(timeout)
        if self.dead_error is None:
            self.dead_error = EngineDeadError("the engine was shut down")

    # ------------------------------------------------------------------ the pipes
    def _read(self, core: _Core) -> None:
        """A core's reader thread: each step's deltas to the callers, until the core goes away.
        Messages that are already waiting are published together: a reader that fell behind
        catches up with one wake-up per event loop, not one per step."""
        while True:
            messages = [core.receive()]
            while messages[-1] is not None and core.results.poll():
                messages.append(core.receive())
            deltas: list[RequestDelta] = []
            stats = None
            for message in messages:
                if message is None:
                    break
                if message[0] == "step":
                    deltas += message[1]
                    stats = message[2]
                elif message[0] == "refused":  # checked here, so the core only refuses on a bug
                    self._fail_stream(core, message[1], ValueError(message[2]))
            if stats is not None:
                self._publish(core, deltas, stats)
            if messages[-1] is None:  # the core has gone away
                break
        # Its callers fail; so does every later request (one replica's loss stops the engine,
        # though the other replicas finish what they hold).
        replica = f"replica {core.replica}, " if len(self._cores) > 1 else ""
        error = self.dead_error or EngineDeadError(
            f"the engine core stopped ({replica}exit code {core.process.exitcode})")
        self.dead_error = error
        with self._lock:
            streams = [request_id for request_id, stream in self._streams.items()
                       if stream.core is core]
            streams = [self._end(request_id) for request_id in streams]
        for stream in streams:
            stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, error)

    def _fail_stream(self, core: _Core, request_id: str, error: BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None or stream.core is not core:
                return
            self._end(request_id)
        stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, error)

    def _end(self, request_id: str) -> _Stream:
        """Forgets a request its core has finished, refused or lost (with the lock held)."""
        stream = self._streams.pop(request_id)
        self._accumulator.forget(request_id)
        self._router.release(stream.core.replica)
        return stream

    def _publish(self, core: _Core, deltas: list[RequestDelta], stats: CoreStats) -> None:
        """Rebuilds each delta of `core`'s step and sends it to its caller; the step's stats to
        `on_iteration`."""
        now = time.monotonic()
        iteration = IterationStats(now)
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            core.stats = stats
            core.num_unseen_adds = 0
            for delta in deltas:
                request_id, core_finished = delta[0], delta[1]
                stream = self._streams.get(request_id)
                if stream is None or stream.core is not core:
                    continue
                if stream.done:  # its end was counted and delivered; the core caught up
                    if core_finished:
                        self._end(request_id)
                    continue
                output, stopped = self._accumulator.apply(delta)
                for request_id, index, stop in stopped:
                    core.send(("finish", request_id, index, stop))
                num_tokens = sum(len(completion.token_ids) for completion in output.outputs)
                if num_tokens > stream.num_tokens:
                    iteration.generation_tokens += num_tokens - stream.num_tokens
                    if stream.last_token_time is None:
                        iteration.prompt_tokens += len(output.prompt_token_ids)
                        iteration.time_to_first_token.append(now - stream.arrival_time)
                    else:
                        iteration.inter_token_latency.append(now - stream.last_token_time)
                    stream.num_tokens, stream.last_token_time = num_tokens, now
                if output.finished:
                    iteration.finished.append(_finished_entry(output, num_tokens, stream, now))
                    if core_finished:
                        self._end(request_id)
                    else:  # a stop string ended it here; the id stays taken until the core has
                        stream.done = True
                if not stream.abandoned:
                    deliveries.setdefault(stream.loop, []).append((stream.outputs, output))
        for loop, items in deliveries.items():
            loop.call_soon_threadsafe(_deliver, items)
        if self.on_iteration is not None:
            self.on_iteration(iteration)


def _enlarge_pipe(connection: multiprocessing.connection.Connection, size: int = 1 << 20) -> None:
    """Gives the core's result pipe a buffer that holds a whole step's message (Linux's default
    is 64 KiB, a step of 1,000 requests sends ~150 KiB), so the core writes it at once and the
    reader takes it in one read. Where the system refuses, the default stays."""
    try:
        fcntl.fcntl(connection.fileno(), fcntl.F_SETPIPE_SZ, size)
    except (AttributeError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size
        pass


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for outputs, output in items:
        outputs.put_nowait(output)


def _finished_entry(output: RequestOutput, num_tokens: int, stream: _Stream,
                    now: float) -> tuple[str, float, float, int, int]:
    """(finish reason, e2e seconds, queue seconds, prompt tokens, output tokens) of a finished
    request; the reason is its first completion's ("error" for any error message)."""
    metrics = output.metrics
    reason = output.outputs[0].finish_reason or "abort"
    if reason.startswith("error"):
        reason = "error"
    queued = max((metrics.first_scheduled_time or now) - metrics.arrival_time, 0.0)
    return reason, now - stream.arrival_time, queued, len(output.prompt_token_ids), num_tokens
