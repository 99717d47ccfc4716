"""The engine for asyncio code (the server): one thread runs the step loop, callers await outputs.

`AsyncLLM.generate(prompt, params, request_id)` is an async iterator of `RequestOutput`s (each the
request's state so far, like `LLM.generate`'s; the last has `finished=True`). Many callers share
one continuous batch. The step loop runs in its own thread, so the event loop stays free for HTTP
while a step runs (XLA releases the GIL while the device works); every call into `LLMEngine`
happens on that thread, so the engine needs no locks. Commands (add, abort, stop) reach the
thread through a queue; outputs go back to each caller's asyncio queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable

from pjllm.config import EngineConfig
from pjllm.engine.engine import LLMEngine, PromptType
from pjllm.outputs import RequestOutput
from pjllm.sampling_params import SamplingParams

logger = logging.getLogger("pjllm")


class EngineDeadError(RuntimeError):
    """The step loop has stopped (it failed, or the engine was shut down): no request can run."""


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


@dataclasses.dataclass
class _Stream:
    """One caller's request: where its outputs go, and how far it has got (loop thread only)."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    num_tokens: int = 0
    last_token_time: float | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class AsyncLLM:
    """An `LLMEngine` served to asyncio callers.

    >>> engine = AsyncLLM("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> async for output in engine.generate("Hello", SamplingParams(max_tokens=8), "req-1"):
    ...     print(output.outputs[0].text)

    Keyword arguments are `EngineConfig` fields, as for `LLM`. `max_waiting_requests` bounds the
    requests that wait for a place in the batch (None: unbounded); past it `generate` raises
    `EngineOverloadedError`. `on_iteration` is called on the loop thread after every step.
    """

    def __init__(self, model: str, *, max_waiting_requests: int | None = None,
                 on_iteration: Callable[[IterationStats], None] | None = None, **engine_kwargs: Any):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_kwargs))
        self.max_waiting_requests = max_waiting_requests
        self.on_iteration = on_iteration
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # loop thread only
        self._num_queued_adds = 0  # adds sent to the loop thread and not yet taken
        self._queued_lock = threading.Lock()
        self.dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pjllm-engine-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    @property
    def is_running(self) -> bool:
        """Whether the step loop is alive and takes requests."""
        return self._thread.is_alive() and self.dead_error is None

    def num_waiting_requests(self) -> int:
        """Sequences waiting for a place in the batch, plus requests not yet handed to the engine."""
        return len(self.engine.scheduler.waiting) + self._num_queued_adds

    def num_running_requests(self) -> int:
        return len(self.engine.scheduler.running)

    def kv_cache_usage(self) -> float:
        """The share of KV cache pages in use, in [0, 1]."""
        manager = self.engine.kv_cache_manager
        return 1.0 - manager.num_free_pages / manager.num_pages

    async def generate(self, prompt: PromptType, params: SamplingParams | None,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Adds a request and yields its state each time it has new tokens; the last output has
        `finished=True`. Raises ValueError for a request the engine refuses (before any output),
        EngineOverloadedError when too many wait, EngineDeadError when the loop has stopped.
        Closing the iterator early (a cancelled task, a `break`) aborts the request."""
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running") from self.dead_error
        if self.max_waiting_requests is not None and self.num_waiting_requests() >= self.max_waiting_requests:
            raise EngineOverloadedError(f"{self.num_waiting_requests()} requests are waiting "
                                        f"(max_waiting_requests {self.max_waiting_requests})")
        params = params if params is not None else self.engine.default_sampling_params()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._queued_lock:
            self._num_queued_adds += 1
        self._commands.put(("add", request_id, prompt, params, stream))
        finished = False
        try:
            while not finished:
                item = await stream.outputs.get()
                # Only the latest state matters: skip outputs a slow caller has not read yet.
                while not stream.outputs.empty() and not isinstance(item, BaseException):
                    item = stream.outputs.get_nowait()
                if isinstance(item, BaseException):  # the engine's refusal, or its death
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # commands run in order: this abort comes after the add
                self._commands.put(("abort", request_id, stream))

    def abort(self, request_id: str) -> None:
        """Stops a request and frees its pages (no-op for an unknown or finished id)."""
        self._commands.put(("abort", request_id, None))

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Aborts every request, stops the loop thread and frees the engine's device memory."""
        if self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.engine.shutdown()

    # ------------------------------------------------------------------ loop thread
    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                # Idle: sleep until a command comes. Busy: take what has come, then step.
                commands = [self._commands.get()] if idle else []
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                if not self._apply(commands):
                    break
                if self.engine.has_unfinished_requests():
                    self._publish(self.engine.step())
        except BaseException as error:  # noqa: BLE001 - every waiting caller must hear of it
            logger.exception("the engine loop failed; no request can run until the server restarts")
            self.dead_error = error
            dead = EngineDeadError(f"the engine loop failed: {type(error).__name__}: {error}")
            for stream in self._streams.values():
                stream.put(dead)
            self._streams.clear()
            self._fail_queued(dead)
            return
        for request_id in list(self._streams):
            self._finish_stream(request_id, self.engine.abort_request(request_id))
        self.dead_error = EngineDeadError("the engine was shut down")
        self._fail_queued(self.dead_error)

    def _apply(self, commands: list[tuple]) -> bool:
        """Runs the callers' commands on the engine; False once told to stop."""
        for command in commands:
            if command[0] == "stop":
                return False
            if command[0] == "abort":
                _, request_id, stream = command
                # A caller's own abort touches its own request only: the id may be reused.
                if stream is None or self._streams.get(request_id) is stream:
                    self._finish_stream(request_id, self.engine.abort_request(request_id))
                continue
            _, request_id, prompt, params, stream = command
            with self._queued_lock:
                self._num_queued_adds -= 1
            try:
                self.engine.add_request(request_id, prompt, params)
            except Exception as error:  # noqa: BLE001 - the caller gets the refusal
                stream.put(error)
                continue
            self._streams[request_id] = stream
        return True

    def _finish_stream(self, request_id: str, output: RequestOutput | None) -> None:
        """Delivers an aborted request's final output and counts it as finished."""
        stream = self._streams.pop(request_id, None)
        if stream is None or output is None:
            return
        stream.put(output)
        if self.on_iteration is not None:
            now = time.monotonic()
            self.on_iteration(IterationStats(now, finished=[_finished_entry(output, stream, now)]))

    def _fail_queued(self, error: BaseException) -> None:
        """Answers adds the loop will never take."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                command[-1].put(error)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """Sends each output to its caller, and the step's stats to `on_iteration`."""
        now = time.monotonic()
        stats = IterationStats(now)
        # One wake-up of each caller event loop per step, not one per request: at hundreds of
        # running requests, per-output wake-ups cost the GIL time a step has.
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            num_tokens = sum(len(completion.token_ids) for completion in output.outputs)
            new_tokens = num_tokens - stream.num_tokens
            if new_tokens > 0:
                stats.generation_tokens += new_tokens
                if stream.last_token_time is None:
                    stats.prompt_tokens += len(output.prompt_token_ids)
                    stats.time_to_first_token.append(now - output.metrics.arrival_time)
                else:
                    stats.inter_token_latency.append(now - stream.last_token_time)
                stream.num_tokens, stream.last_token_time = num_tokens, now
            if output.finished:
                stats.finished.append(_finished_entry(output, stream, now))
                del self._streams[output.request_id]
            deliveries.setdefault(stream.loop, []).append((stream.outputs, output))
        for loop, items in deliveries.items():
            loop.call_soon_threadsafe(_deliver, items)
        if self.on_iteration is not None:
            self.on_iteration(stats)


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for outputs, output in items:
        outputs.put_nowait(output)


def _finished_entry(output: RequestOutput, stream: _Stream, now: float) -> tuple[str, float, float, int, int]:
    """(finish reason, e2e seconds, queue seconds, prompt tokens, output tokens) of a finished
    request; the reason is its first completion's ("error" for any error message)."""
    metrics = output.metrics
    reason = output.outputs[0].finish_reason or "abort"
    if reason.startswith("error"):
        reason = "error"
    queued = (metrics.first_scheduled_time or now) - metrics.arrival_time
    num_tokens = sum(len(completion.token_ids) for completion in output.outputs)
    return reason, now - metrics.arrival_time, queued, len(output.prompt_token_ids), num_tokens
