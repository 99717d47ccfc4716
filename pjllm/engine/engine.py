"""The step loop: requests in, one scheduled and executed batch per step, outputs back."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from pjllm.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineConfig, ModelConfig
from pjllm.engine.detokenizer import decode_new_text, find_stop_string, start_detokenizer
from pjllm.engine.kv_cache_manager import KVCacheManager, pages_needed
from pjllm.engine.scheduler import ScheduledSeq, Scheduler
from pjllm.engine.sequence import Request, Sequence
from pjllm.kernels import ops
from pjllm.models.loader import build_model
from pjllm.outputs import CompletionOutput, Logprob, RequestOutput
from pjllm.runner.model_runner import ModelRunner, StepHandle, StepResult
from pjllm.sampling_params import SamplingParams

logger = logging.getLogger("pjllm")

PromptType = str | dict[str, Any] | list[int]
# Without device memory statistics (CPU), the KV cache gets at most this many bytes.
_HOST_KV_CACHE_BYTES = 1 << 30


@dataclasses.dataclass
class StepTimings:
    """Where the engine's step loop spends wall time (cumulative since the engine started).

    host_s: scheduling, input preparation, dispatch and output processing; wait_s: blocked on the
    device for a step's tokens. With async scheduling, wait_s >> 0 means the device is the
    bottleneck; wait_s near 0 means the host is.
    """

    steps: int = 0
    host_s: float = 0.0
    wait_s: float = 0.0


@dataclasses.dataclass
class _InFlightStep:
    """A dispatched step whose sampled tokens the host has not processed yet."""

    scheduled: list[ScheduledSeq]
    chunk_starts: list[int]  # each chunk's first position
    samples: list[bool]  # whether each chunk's last token was sampled
    handle: StepHandle


def _resolve_dtype(dtype: str) -> Any:
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(dtype)


def enable_compilation_cache(directory: str | None) -> None:
    """Turns on JAX's persistent compilation cache, so a restart skips XLA compiles."""
    if directory is None:
        return
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache every program, small ones too: at startup many sub-second compiles add up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class LLMEngine:
    """Owns the model runner, the scheduler and every request's state."""

    def __init__(self, config: EngineConfig):
        from pjllm.models.weights import load_hf_config, load_tokenizer

        self.config = config
        if config.load_format != "dummy" and not os.path.exists(config.model):
            raise ValueError(f"model path {config.model!r} does not exist")
        enable_compilation_cache(config.compilation_cache_dir)
        self.model_config = ModelConfig.from_hf_config(load_hf_config(config.model))
        wants_tokenizer = not config.skip_tokenizer_init and (config.load_format != "dummy"
                                                              or config.tokenizer is not None)
        self.tokenizer = load_tokenizer(config.model, config.tokenizer) if wants_tokenizer else None
        self.dtype = _resolve_dtype(config.dtype)
        self.max_model_len = self._resolve_max_model_len()
        self.max_num_batched_tokens = config.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
        self.attention_backend = config.attention_backend
        if self.attention_backend == "auto":
            self.attention_backend = "reference" if jax.default_backend() == "cpu" else "pallas"

        load_format = config.load_format
        if load_format == "auto":
            load_format = "gguf" if config.model.endswith(".gguf") else "safetensors"
        # Seconds spent in each startup phase, for `pjllm bench startup` and logs.
        self.startup_timings: dict[str, float] = {}
        start = time.perf_counter()
        graphdef, state = build_model(self.model_config, self.dtype, load_format, config.model,
                                      config.seed)
        self.startup_timings["load_weights_s"] = time.perf_counter() - start
        num_pages = config.num_pages or self._num_pages_from_memory()
        if num_pages * config.page_size < self.max_model_len:
            raise ValueError(
                f"num_pages ({num_pages}) x page_size ({config.page_size}) holds fewer tokens than "
                f"max_model_len ({self.max_model_len}); raise num_pages or gpu_memory_utilization, "
                f"or lower max_model_len")
        logger.info("KV cache: %d pages of %d tokens = %d tokens (max_model_len %d)", num_pages,
                    config.page_size, num_pages * config.page_size, self.max_model_len)
        self.model_runner = ModelRunner(
            self.model_config, graphdef, state, num_pages=num_pages, page_size=config.page_size,
            max_model_len=self.max_model_len, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, dtype=self.dtype,
            attention_backend=self.attention_backend)
        self.kv_cache_manager = KVCacheManager(num_pages, config.page_size)
        self.scheduler = Scheduler(self.kv_cache_manager, config.max_num_seqs,
                                   self.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._seed_rng = np.random.default_rng(config.seed)
        self._next_seq_id = 0
        self._in_flight: _InFlightStep | None = None
        self.step_timings = StepTimings()
        self._num_penalty_requests = 0
        warmup = config.warmup
        if warmup == "auto":
            warmup = "off" if jax.default_backend() == "cpu" else "background"
        if warmup != "off":
            self.model_runner.start_warmup()
        if warmup == "blocking":
            self.wait_for_warmup()

    def wait_for_warmup(self) -> None:
        """Blocks until every step program of the startup warmup is compiled (at once when the
        warmup is off or done); its timings go into `startup_timings`."""
        self.startup_timings.update(self.model_runner.wait_for_warmup())

    def _resolve_max_model_len(self) -> int:
        """The user's max_model_len, or the model's; never past a sliding attention window,
        since the attention kernels attend to the whole context."""
        window = self.model_config.sliding_window
        if self.config.max_model_len is None:
            return min(self.model_config.max_position_embeddings, window or 1 << 62)
        if window is not None and self.config.max_model_len > window:
            raise ValueError(f"max_model_len ({self.config.max_model_len}) must be <= the model's "
                             f"sliding_window ({window}): sliding-window attention is not supported")
        return self.config.max_model_len

    def _num_pages_from_memory(self) -> int:
        cfg = self.model_config
        page_bytes = cfg.num_layers * ops.kv_cache_bytes_per_page(
            self.config.page_size, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            itemsize = jnp.dtype(self.dtype).itemsize
            # Peak activations of one step: MLP intermediates for the token budget, plus float32
            # logits (and their sort) for every sequence, plus a margin for XLA's workspace.
            activations = (self.max_num_batched_tokens * cfg.intermediate_size * itemsize * 4
                           + self.config.max_num_seqs * cfg.vocab_size * 4 * 4 + (512 << 20))
            budget = (stats["bytes_limit"] * self.config.gpu_memory_utilization
                      - stats.get("bytes_in_use", 0) - activations)
        else:
            wanted = self.config.max_num_seqs * pages_needed(self.max_model_len, self.config.page_size)
            budget = min(wanted * page_bytes, _HOST_KV_CACHE_BYTES * self.config.gpu_memory_utilization)
        num_pages = int(budget // page_bytes)
        if num_pages < 1:
            raise ValueError("no device memory is left for the KV cache; raise "
                             "gpu_memory_utilization or give num_pages explicitly")
        return num_pages

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams) -> None:
        """Validates and queues a request; it joins the running batch at the next step."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        if not token_ids:
            raise ValueError("prompt must not be empty")
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prompt_token_ids must be in [0, {vocab}); got values outside")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens; it must be shorter than "
                             f"max_model_len ({self.max_model_len})")
        eos = () if params.ignore_eos else self.model_config.eos_token_ids
        request = Request(request_id, text, token_ids, params, eos_token_ids=eos)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * len(token_ids)
        base_seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**31))
        max_num_tokens = min(len(token_ids) + (params.max_tokens or self.max_model_len),
                             self.max_model_len)
        for index in range(params.n):
            seq = Sequence(self._next_seq_id, request, index, base_seed & 0xFFFFFFFF, list(token_ids),
                           len(token_ids), max_num_tokens)
            self._next_seq_id += 1
            if params.logprobs is not None:
                seq.logprobs = []
            start_detokenizer(seq)
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = request
        if params.uses_penalties:
            self._num_penalty_requests += 1

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" not in prompt:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, (list, tuple)):
            return None, [int(t) for t in prompt]
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, a token id list or a dict; got {type(prompt)}")
        if not prompt:
            raise ValueError("prompt must not be empty")
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer (skip_tokenizer_init, or dummy weights): "
                             "pass prompt_token_ids")
        return prompt, self.tokenizer.encode(prompt)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is not None:
            for seq in request.seqs:
                self.scheduler.finish(seq, "abort")
            self._forget(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ------------------------------------------------------------------ the step
    def step(self, include_unfinished: bool = True) -> list[RequestOutput]:
        """Dispatches the next batch, then processes the previous one while the device works.

        Returns the state of every request whose tokens were processed in this call (with async
        scheduling those are the previous step's), or only of those that finished when
        `include_unfinished` is False. Finished requests are forgotten.
        """
        start = time.perf_counter()
        wait_before = self.step_timings.wait_s
        outputs: list[RequestOutput] = []
        if self._in_flight is not None and (not self.config.async_scheduling
                                            or self._num_penalty_requests):
            # Penalties read every output token on the host: no step may run ahead.
            outputs += self._process(self._in_flight, include_unfinished)
            self._in_flight = None
        scheduled = self.scheduler.schedule().scheduled
        dispatched = self._dispatch(scheduled) if scheduled else None
        if self._in_flight is not None:
            outputs += self._process(self._in_flight, include_unfinished)
        self._in_flight = dispatched
        timings = self.step_timings
        timings.steps += 1
        timings.host_s += time.perf_counter() - start - (timings.wait_s - wait_before)
        return outputs

    def _dispatch(self, scheduled: list[ScheduledSeq]) -> "_InFlightStep":
        batch, variant = self.model_runner.prepare(scheduled)
        handle = self.model_runner.dispatch(batch, variant)
        chunk_starts, samples = [], []
        for row, item in enumerate(scheduled):
            seq = item.seq
            chunk_starts.append(seq.num_computed_tokens)
            samples.append(item.samples)
            seq.num_computed_tokens += item.num_new_tokens
            if samples[-1]:
                seq.add_pending_token(row)
        return _InFlightStep(scheduled, chunk_starts, samples, handle)

    def _process(self, step: "_InFlightStep", include_unfinished: bool) -> list[RequestOutput]:
        start = time.perf_counter()
        result = self.model_runner.fetch(step.handle)
        self.step_timings.wait_s += time.perf_counter() - start
        touched: dict[str, Request] = {}
        cursor = 0
        for row, (item, chunk_start, samples) in enumerate(zip(step.scheduled, step.chunk_starts,
                                                               step.samples)):
            seq = item.seq
            touched[seq.request.request_id] = seq.request
            if result.prompt_logprobs is not None:
                self._record_prompt_logprobs(seq, chunk_start, item.num_new_tokens, cursor, result)
            cursor += item.num_new_tokens
            if samples and not seq.is_finished:
                self._append_token(seq, row, result)
        outputs = []
        for request in touched.values():
            finished = request.is_finished
            if finished or include_unfinished:
                outputs.append(self._request_output(request))
            if finished:
                self._forget(request)
        return outputs

    def _forget(self, request: Request) -> None:
        if self.requests.pop(request.request_id, None) is not None and request.params.uses_penalties:
            self._num_penalty_requests -= 1

    def _record_prompt_logprobs(self, seq: Sequence, start: int, num_tokens: int, cursor: int,
                                result: StepResult) -> None:
        request = seq.request
        if request.prompt_logprobs is None or seq.sample_index != 0:
            return
        target_logprobs, top_ids, top_logprobs = result.prompt_logprobs
        stop = min(start + num_tokens, seq.num_prompt_tokens - 1)
        for position in range(start, stop):
            row = cursor + position - start
            target = seq.token_ids[position + 1]
            request.record_prompt_logprobs(position + 1, self._logprob_entry(
                target, target_logprobs[row], top_ids[row], top_logprobs[row],
                request.params.prompt_logprobs))

    def _logprob_entry(self, token: int, logprob: float, top_ids: np.ndarray, top_logprobs: np.ndarray,
                       num: int) -> dict[int, Logprob]:
        top = [int(t) for t in top_ids[:num]]
        rank = top.index(token) + 1 if token in top else None
        entry = {token: Logprob(float(logprob), rank, self._decode_token(token))}
        for index, candidate in enumerate(top):
            entry.setdefault(candidate, Logprob(float(top_logprobs[index]), index + 1,
                                                self._decode_token(candidate)))
        return entry

    def _decode_token(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else None

    def _append_token(self, seq: Sequence, row: int, result: StepResult) -> None:
        sampled = result.sampled
        token = int(sampled.token_ids[row])
        seq.resolve_pending_token(token)
        logprob = float(sampled.logprobs[row])
        seq.cumulative_logprob += logprob
        params = seq.params
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprob_entry(token, logprob, sampled.top_logprob_ids[row],
                                                    sampled.top_logprobs[row], params.logprobs))
        new_text_len = len(decode_new_text(self.tokenizer, seq)) if self.tokenizer is not None else 0

        past_min = seq.num_resolved_tokens - seq.num_prompt_tokens >= params.min_tokens
        if past_min and token in seq.request.eos_token_ids:
            self.scheduler.finish(seq, "stop")
        elif past_min and token in params.stop_token_ids:
            self.scheduler.finish(seq, "stop", token)
        elif past_min and params.stop and (stop := find_stop_string(seq, new_text_len)) is not None:
            self.scheduler.finish(seq, "stop", stop)
        elif seq.num_resolved_tokens >= seq.max_num_tokens:
            self.scheduler.finish(seq, "length")

    def _request_output(self, request: Request) -> RequestOutput:
        completions = [CompletionOutput(
            index=seq.sample_index, text=seq.text, token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            logprobs=seq.logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
            for seq in request.seqs]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             request.prompt_logprobs, completions, request.is_finished)

    def run_to_completion(self, request_ids: Iterable[str] | None = None,
                          progress=None) -> dict[str, RequestOutput]:
        """Steps until nothing is left; returns each request's final output by id."""
        finished: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for output in self.step(include_unfinished=False):
                if output.finished:
                    finished[output.request_id] = output
                    if progress is not None:
                        progress.update(1)
        return finished
