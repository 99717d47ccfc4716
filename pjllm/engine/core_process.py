"""The engine core in a process of its own: the step loop, fed by commands, sending back deltas.

A server's HTTP work (parsing, JSON, SSE framing) and the step loop's host work both need the
GIL; in one process they take turns, and the steps slow down (docs/perf.md, serving). Here the
core (`LLMEngine`) runs alone in a child process. Commands come down a pipe: ("add", request_id,
{"prompt", "prompt_token_ids"}, SamplingParams) with ids the front end already checked,
("abort", request_id) and ("stop",). After every step it sends one message up a pipe:
("step", [RequestDelta], CoreStats). A delta carries only what changed since the last one (new
token ids, new text, new logprobs), so a message's size follows the step, not the requests'
lengths. `OutputAccumulator` turns deltas back into RequestOutputs on the front end's side.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing.connection
from typing import Any

from pjllm.config import EngineConfig
from pjllm.engine.sequence import Request
from pjllm.outputs import CompletionOutput, PromptLogprobs, RequestMetrics, RequestOutput, SampleLogprobs

logger = logging.getLogger("pjllm")


@dataclasses.dataclass
class CompletionDelta:
    """What one sequence gained: its token ids from `token_start` on (earlier ones unchanged)
    with their logprobs, and its text from `text_start` on (a stop string may cut text already
    sent, so the front end keeps text[:text_start] and appends `text`)."""

    index: int
    token_start: int
    token_ids: list[int]
    logprobs: SampleLogprobs | None
    cumulative_logprob: float | None
    text_start: int
    text: str
    finish_reason: str | None
    stop_reason: int | str | None


@dataclasses.dataclass
class RequestDelta:
    """One request's changes in a step; the prompt fields come with its first delta only."""

    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    metrics: RequestMetrics
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None


@dataclasses.dataclass
class CoreStats:
    """The scheduler's state after a step, for gauges and admission."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int


class _DeltaTracker:
    """What each request has been sent so far (core side): (tokens, text length) per sequence."""

    def __init__(self) -> None:
        self._sent: dict[int, tuple[int, int]] = {}  # by id(request): ids may be reused

    def delta(self, request: Request) -> RequestDelta:
        first = id(request) not in self._sent
        sent = self._sent.get(id(request)) or [(0, 0)] * len(request.seqs)
        completions, now_sent = [], []
        for seq, (num_tokens, text_len) in zip(request.seqs, sent):
            tokens = seq.output_token_ids
            text_start = min(text_len, len(seq.text))
            completions.append(CompletionDelta(
                seq.sample_index, num_tokens, tokens[num_tokens:],
                seq.logprobs[num_tokens:len(tokens)] if seq.logprobs is not None else None,
                seq.cumulative_logprob if seq.logprobs is not None else None,
                text_start, seq.text[text_start:], seq.finish_reason, seq.stop_reason))
            now_sent.append((len(tokens), len(seq.text)))
        if request.is_finished:
            self._sent.pop(id(request), None)
        else:
            self._sent[id(request)] = now_sent
        metrics = RequestMetrics(request.arrival_time, request.first_scheduled_time,
                                 request.first_token_time)
        delta = RequestDelta(request.request_id, completions, request.is_finished, metrics)
        if first:
            delta.prompt, delta.prompt_token_ids = request.prompt, request.prompt_token_ids
            delta.prompt_logprobs = request.prompt_logprobs
        return delta

class OutputAccumulator:
    """Front-end side: RequestOutputs rebuilt from deltas, one per live request."""

    def __init__(self) -> None:
        self._outputs: dict[str, RequestOutput] = {}

    def apply(self, delta: RequestDelta) -> RequestOutput:
        output = self._outputs.get(delta.request_id)
        if output is None:
            output = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids or [],
                                   delta.prompt_logprobs, [], False)
            self._outputs[delta.request_id] = output
        completions = {c.index: c for c in output.outputs}
        for change in delta.completions:
            completion = completions.get(change.index)
            if completion is None:
                completion = CompletionOutput(change.index, "", [], None,
                                              [] if change.logprobs is not None else None)
                completions[change.index] = completion
            completion.token_ids = completion.token_ids[:change.token_start] + change.token_ids
            if change.logprobs is not None:
                completion.logprobs = completion.logprobs[:change.token_start] + change.logprobs
            completion.cumulative_logprob = change.cumulative_logprob
            completion.text = completion.text[:change.text_start] + change.text
            completion.finish_reason, completion.stop_reason = change.finish_reason, change.stop_reason
        # A new object each time: the caller may still hold (and read) the previous one.
        output = dataclasses.replace(output, outputs=[dataclasses.replace(completions[i])
                                                      for i in sorted(completions)],
                                     finished=delta.finished, metrics=delta.metrics)
        if delta.finished:
            self._outputs.pop(delta.request_id, None)
        else:
            self._outputs[delta.request_id] = output
        return output

    def forget(self, request_id: str) -> None:
        self._outputs.pop(request_id, None)


def run_engine_core(config: EngineConfig, commands: multiprocessing.connection.Connection,
                    results: multiprocessing.connection.Connection) -> None:
    """The child process's main: builds the engine, says ("ready",), then serves commands and
    steps until told to stop or its parent goes away. An error building the engine is sent as
    ("failed", message)."""
    from pjllm.engine.engine import LLMEngine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        engine = LLMEngine(config)
    except Exception as error:  # noqa: BLE001 - the parent reports it
        results.send(("failed", f"{type(error).__name__}: {error}"))
        return
    results.send(("ready",))
    tracker = _DeltaTracker()
    try:
        while True:
            idle = not engine.has_unfinished_requests()
            if idle:
                commands.poll(None)  # sleep until a command comes
            while commands.poll():
                if not _apply(engine, tracker, commands.recv(), results):
                    return
            if engine.has_unfinished_requests():
                deltas = [tracker.delta(request) for request in engine.step_requests()]
                results.send(("step", deltas, _stats(engine)))
    except (EOFError, BrokenPipeError):  # the front end is gone
        return
    finally:
        engine.shutdown()


def _apply(engine: Any, tracker: _DeltaTracker, command: tuple,
           results: multiprocessing.connection.Connection) -> bool:
    """Runs one command; False once told to stop."""
    if command[0] == "stop":
        return False
    if command[0] == "abort":
        request = engine.requests.get(command[1])
        if engine.abort_request(command[1]) is not None:  # its final state, finish reason "abort"
            results.send(("step", [tracker.delta(request)], _stats(engine)))
        return True
    _, request_id, prompt, params = command
    try:
        engine.add_request(request_id, prompt, params)
    except Exception as error:  # noqa: BLE001 - the front end checked it; report, don't die
        results.send(("refused", request_id, f"{type(error).__name__}: {error}"))
    return True


def _stats(engine: Any) -> CoreStats:
    manager = engine.kv_cache_manager
    return CoreStats(len(engine.scheduler.running), len(engine.scheduler.waiting),
                     1.0 - manager.num_free_pages / manager.num_pages, engine.scheduler.num_preemptions)
