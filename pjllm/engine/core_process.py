"""The engine core in a process of its own: the step loop, fed by commands, sending back deltas.

A server's HTTP work (parsing, JSON, SSE framing) and the step loop's host work both need the
GIL; in one process they take turns, and the steps slow down (docs/perf.md, serving). Here the
core (`LLMEngine`) runs alone in a child process. Commands come down a pipe: ("add", request_id,
{"prompt", "prompt_token_ids"}, SamplingParams) with ids the front end already checked,
("abort", request_id) and ("stop",). After every step it sends one message up a pipe:
("step", [RequestDelta], CoreStats). A delta carries only what changed since the last one (new
token ids and their logprobs), so a message's size follows the step, not the requests' lengths.
The core makes no text: `OutputAccumulator`, on the front end's side, detokenizes, checks stop
strings (and sends ("finish", request_id, index, stop) for a sequence whose stop string
matched) and turns the deltas back into RequestOutputs, so neither text nor a slow client ever
holds up a step.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing.connection
import queue
import threading
import time
from typing import Any, Callable

from pjllm.config import EngineConfig
from pjllm.engine.detokenizer import (TokenTexts, decode_new_text, find_stop_string,
                                      start_detokenizer)
from pjllm.engine.sequence import Request
from pjllm.outputs import (CompletionOutput, FlatLogprobs, Logprob, PromptLogprobs,
                           RequestMetrics, RequestOutput, SampleLogprobs)
from pjllm.sampling_params import SamplingParams

logger = logging.getLogger("pjllm")


# A step's deltas travel as plain tuples: for a step of 1,000 requests, building, pickling and
# unpickling them as dataclasses took four times as long, time the step loop and the reader pay.
#
# CompletionDelta: (token_ids, logprobs, finish_reason, stop_reason): a sequence's output tokens
#                  new since its last delta, their logprobs (None: not asked for; decoded_token
#                  None, the front end decodes), and its finish and stop reasons.
# RequestDelta:    (request_id, finished, metrics, num_cached_tokens, prompt_logprobs,
#                  completions): metrics is (arrival_time, first_scheduled_time,
#                  first_token_time); num_cached_tokens as RequestOutput's; prompt_logprobs come
#                  once, in the first delta after the prompt is done, else None; completions has
#                  one CompletionDelta per sequence, by sample index.
CompletionDelta = tuple[list[int], SampleLogprobs | None, str | None, int | str | None]
RequestDelta = tuple[str, bool, tuple[float, float | None, float | None], int | None,
                     PromptLogprobs | None, list[CompletionDelta]]


@dataclasses.dataclass
class CoreStats:
    """The scheduler's state after a step, for gauges and admission."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    # Prefix cache totals since start, in tokens: looked up, and found cached.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    @classmethod
    def combine(cls, replicas: list["CoreStats"]) -> "CoreStats":
        """Data-parallel replicas' stats as one engine's: counts summed, KV cache usage the
        replicas' mean (each has its own pages)."""
        if len(replicas) == 1:
            return replicas[0]
        totals = {field.name: sum(getattr(stats, field.name) for stats in replicas)
                  for field in dataclasses.fields(cls)}
        totals["kv_cache_usage"] /= len(replicas)
        return cls(**totals)


class _DeltaTracker:
    """How many tokens of each sequence have been sent (core side), by request identity: ids
    may be reused."""

    def __init__(self) -> None:
        self._sent: dict[int, list[int]] = {}
        self._prompt_logprobs_sent: set[int] = set()

    def delta(self, request: Request) -> RequestDelta:
        key = id(request)
        sent = self._sent.get(key)
        completions, num_known = [], []
        for index, seq in enumerate(request.seqs):
            # Sliced from token_ids, not from output_token_ids (a copy of the whole output):
            # the cost of a delta follows the step, not the sequence's length.
            start, end = seq.num_prompt_tokens, seq.num_resolved_tokens
            num_sent = sent[index] if sent else 0
            completions.append((seq.token_ids[start + num_sent:end],
                                seq.logprobs[num_sent:end - start] if seq.logprobs is not None else None,
                                seq.finish_reason, seq.stop_reason))
            num_known.append(end - start)
        finished = request.is_finished
        prompt_logprobs = None
        # Prompt logprobs once the prompt is done (a first token, or the end), not part-filled
        # after a first prefill chunk.
        if (request.prompt_logprobs is not None and (finished or any(num_known))
                and key not in self._prompt_logprobs_sent):
            prompt_logprobs = request.prompt_logprobs
            self._prompt_logprobs_sent.add(key)
        if finished:
            self._sent.pop(key, None)
            self._prompt_logprobs_sent.discard(key)
        else:
            self._sent[key] = num_known
        return (request.request_id, finished, (request.arrival_time, request.first_scheduled_time,
                                               request.first_token_time),
                request.num_cached_tokens, prompt_logprobs, completions)


@dataclasses.dataclass(eq=False)
class _Text:
    """Front-end state of one sequence: what `engine/detokenizer.py` reads and writes (the
    same fields as a Sequence's), its output so far, and whether a stop string ended it."""

    params: SamplingParams
    token_ids: list[int]  # prompt, then output
    num_prompt_tokens: int
    logprobs: SampleLogprobs | None
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    stopped_here: bool = False

    @property
    def num_resolved_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(eq=False)
class _RequestText:
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    seqs: dict[int, _Text]


class OutputAccumulator:
    """Front-end side: RequestOutputs rebuilt from the core's deltas, with their text.

    Tokens are detokenized one at a time, as `LLMEngine` does in-process, so stop strings cut
    the text at the same place; a sequence whose stop string matched is finished here at once
    (tokens the core sampled after it are dropped) and `apply` says which to finish in the core.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._token_texts = TokenTexts(tokenizer) if tokenizer is not None else None
        self._requests: dict[str, _RequestText] = {}

    def start(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
              params: SamplingParams) -> None:
        seqs = {}
        for index in range(params.n):
            text = _Text(params, list(prompt_token_ids), len(prompt_token_ids),
                         FlatLogprobs() if params.logprobs is not None else None)
            start_detokenizer(text)
            seqs[index] = text
        self._requests[request_id] = _RequestText(prompt, list(prompt_token_ids), None, seqs)

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def apply(self, delta: RequestDelta) -> tuple[RequestOutput, list[tuple[str, int, str]]]:
        """The request's output after `delta`, and the (request_id, index, stop string) of each
        sequence a stop string ended in this delta."""
        request_id, _, metrics, num_cached_tokens, prompt_logprobs, changes = delta
        state = self._requests[request_id]
        if prompt_logprobs is not None:
            state.prompt_logprobs = [None if entry is None else self._decoded(entry)
                                     for entry in prompt_logprobs]
        stopped = []
        for index, (token_ids, logprobs, finish_reason, stop_reason) in enumerate(changes):
            seq = state.seqs[index]
            if seq.stopped_here:
                continue  # tokens sampled after its stop string
            for offset, token in enumerate(token_ids):
                seq.token_ids.append(token)
                if seq.logprobs is not None:
                    ids, values, ranks, texts = logprobs.position(offset)
                    if self._token_texts is not None:
                        texts = [self._token_texts(t) for t in ids]
                    seq.logprobs.append(ids, values, ranks, texts)
                    seq.cumulative_logprob += values[0]  # the sampled token comes first
                stop = self._stop_string(seq)
                if stop is not None:
                    seq.finish_reason, seq.stop_reason, seq.stopped_here = "stop", stop, True
                    stopped.append((request_id, index, stop))
                    break
            else:
                seq.finish_reason, seq.stop_reason = finish_reason, stop_reason
        completions = [CompletionOutput(
            index, seq.text, seq.token_ids[seq.num_prompt_tokens:],
            seq.cumulative_logprob if seq.logprobs is not None else None,
            seq.logprobs.snapshot() if seq.logprobs is not None else None, seq.finish_reason,
            seq.stop_reason)
            for index, seq in sorted(state.seqs.items())]
        finished = all(c.finish_reason is not None for c in completions)
        output = RequestOutput(request_id, state.prompt, state.prompt_token_ids,
                               state.prompt_logprobs, completions, finished, RequestMetrics(*metrics),
                               num_cached_tokens)
        return output, stopped

    def _stop_string(self, seq: _Text) -> str | None:
        """Detokenizes the newest token; returns the stop string it completed, if any."""
        if self.tokenizer is None:
            return None
        return find_stop_string(seq, len(decode_new_text(self.tokenizer, seq)))

    def _decoded(self, entry: dict[int, Logprob]) -> dict[int, Logprob]:
        if self._token_texts is None:
            return entry
        return {token: Logprob(lp.logprob, lp.rank, self._token_texts(token))
                for token, lp in entry.items()}


class _GarbageCollectionTimer:
    """Seconds spent in Python's garbage collector while it is installed."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total_s += time.perf_counter() - self._start

    def stop(self) -> None:
        gc.callbacks.remove(self._callback)


class _Outbox:
    """Sends the core's messages from a thread of their own, in order, so the step loop never
    waits on the pipe: a step's message (~150 bytes per running request) is larger than a
    pipe's buffer, and the front end reads it between its own work. At most `max_pending`
    messages wait; beyond that `put` blocks, so a stalled front end holds the loop back rather
    than filling memory."""

    def __init__(self, results: multiprocessing.connection.Connection, max_pending: int = 64):
        self._results = results
        self._queue: queue.Queue = queue.Queue(max_pending)
        self.wait_s = 0.0  # time `put` blocked on a full queue
        self._thread = threading.Thread(target=self._run, name="pjllm-core-outbox", daemon=True)
        self._thread.start()

    def put(self, message: tuple) -> None:
        """Queues `message`; raises EOFError once the front end is gone."""
        start = time.perf_counter()
        while True:
            if not self._thread.is_alive():
                raise EOFError("the front end is gone")
            try:
                self._queue.put(message, timeout=1.0)
                break
            except queue.Full:
                pass
        self.wait_s += time.perf_counter() - start

    def close(self) -> None:
        """Sends what is queued, then stops the thread."""
        try:
            self.put(None)
        except EOFError:
            return
        self._thread.join(30)

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                self._results.send(message)
            except (BrokenPipeError, OSError):  # the front end is gone; the loop sees it too
                return


def run_engine_core(config: EngineConfig, replica: int,
                    commands: multiprocessing.connection.Connection,
                    results: multiprocessing.connection.Connection) -> None:
    """The child process's main: builds data-parallel replica `replica`'s engine on that
    replica's devices (`sharding.replica_devices`), says ("ready",), then serves commands and
    steps until told to stop or its parent goes away. An error building the engine (too few
    devices for tensor x data parallel sizes, too) is sent as ("failed", message)."""
    from pjllm.engine.engine import LLMEngine
    from pjllm.sharding import distributed, replica_devices

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        # Several hosts: this process is process 0 of JAX's distributed runtime (the front end
        # that started it never touches a device).
        distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
        devices = replica_devices(config.tensor_parallel_size, config.data_parallel_size, replica)
        engine = LLMEngine(config, detokenize=False, devices=devices)
    except Exception as error:  # noqa: BLE001 - the parent reports it
        results.send(("failed", f"{type(error).__name__}: {error}"))
        return
    results.send(("ready",))
    tracker = _DeltaTracker()
    outbox = _Outbox(results)
    gc_timer = _GarbageCollectionTimer()
    idle_s = 0.0
    try:
        while True:
            if not engine.has_unfinished_requests():
                start = time.perf_counter()
                commands.poll(None)  # sleep until a command comes
                idle_s += time.perf_counter() - start
            while commands.poll():
                if not _apply(engine, tracker, commands.recv(), outbox.put):
                    return
            if engine.has_unfinished_requests():
                deltas = [tracker.delta(request) for request in engine.step_requests()]
                outbox.put(("step", deltas, _stats(engine)))
    except EOFError:  # the front end is gone
        return
    finally:
        timings = engine.step_timings
        logger.info("engine core %d: %d steps: %.1f s of host work, %.1f s waiting for the "
                    "device; %.1f s idle, %.1f s waiting to send, %.1f s collecting garbage",
                    replica, timings.steps, timings.host_s, timings.wait_s, idle_s, outbox.wait_s,
                    gc_timer.total_s)
        gc_timer.stop()
        outbox.close()
        engine.shutdown()


def _apply(engine: Any, tracker: _DeltaTracker, command: tuple,
           send: Callable[[tuple], None]) -> bool:
    """Runs one command; False once told to stop."""
    if command[0] == "stop":
        return False
    if command[0] == "finish":
        _, request_id, index, stop = command
        request = engine.finish_sequence(request_id, index, stop)
        if request is not None:
            send(("step", [tracker.delta(request)], _stats(engine)))
        return True
    if command[0] == "abort":
        request = engine.requests.get(command[1])
        if engine.abort_request(command[1]) is not None:  # its final state, finish reason "abort"
            send(("step", [tracker.delta(request)], _stats(engine)))
        return True
    _, request_id, prompt, params, priority = command
    try:
        engine.add_request(request_id, prompt, params, priority)
    except Exception as error:  # noqa: BLE001 - the front end checked it; report, don't die
        send(("refused", request_id, f"{type(error).__name__}: {error}"))
    return True


def _stats(engine: Any) -> CoreStats:
    manager = engine.kv_cache_manager
    return CoreStats(len(engine.scheduler.running), len(engine.scheduler.waiting),
                     1.0 - manager.num_free_pages / manager.num_pages, engine.scheduler.num_preemptions,
                     manager.num_queried_tokens, manager.num_hit_tokens)
