"""The step loop: requests in, one scheduled and executed batch per step, outputs back."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pjllm.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineConfig
from pjllm.engine.detokenizer import (TokenTexts, decode_new_text, find_stop_string,
                                      start_detokenizer)
from pjllm.engine.input_processor import InputProcessor, PromptType
from pjllm.engine.kv_cache_manager import KVCacheManager, pages_needed
from pjllm.engine.router import draw_seed
from pjllm.engine.scheduler import ScheduledSeq, ScheduledStep, Scheduler
from pjllm.engine.sequence import Request, Sequence
from pjllm.kernels import ops
from pjllm.models.loader import build_model
from pjllm.models.orbax_checkpoint import is_orbax_checkpoint
from pjllm.outputs import CompletionOutput, FlatLogprobs, Logprob, RequestMetrics, RequestOutput
from pjllm.runner.memory import kv_cache_bytes
from pjllm.runner.model_runner import ModelRunner, StepHandle, StepResult
from pjllm.runner.sampler import SamplerOutput, TokenLogprobs
from pjllm.sampling_params import SamplingParams
from pjllm.sharding import distributed, kv_head_replicas, make_mesh, replica_devices

logger = logging.getLogger("pjllm")



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


def executable_store_dir(config: EngineConfig) -> str | None:
    """The folder of the compiled step programs kept for the next process
    (runner/executable_store.py): a subfolder of the compilation cache, and like it off
    without one. Off with several processes too: whether a program serialized by each process
    of a multi-host mesh loads and runs in step with the others after a restart is untested, so
    there every start traces and lowers its programs (XLA's cache still spares the compile)."""
    if config.compilation_cache_dir is None:
        return None
    if config.num_processes > 1:
        logger.info("the compiled program store is off with several processes "
                    "(num_processes=%d); only XLA's compilation cache is used", config.num_processes)
        return None
    return os.path.join(config.compilation_cache_dir, "pjllm-programs")


class LLMEngine:
    """Owns the model runner, the scheduler and every request's state.

    With `detokenize=False` (the engine core of a server) it loads no tokenizer, takes prompts as
    token ids, and its outputs carry token ids only: no text, no stop strings, no decoded
    logprob tokens; the caller does that off the step loop
    (`engine/core_process.py`) and ends a sequence whose stop string matched with
    `finish_sequence`.

    One engine is one replica of the model: on `devices` (default: data-parallel replica 0's,
    the first `tensor_parallel_size`), which hold its weights, its KV cache, sized from their
    own memory, and every step. A data-parallel engine runs several (`engine/data_parallel.py`,
    `engine/async_engine.py`); `seed_rng` is then the generator all of them draw unseeded
    requests' seeds from (`engine/router.py`), else the engine has its own, seeded with
    `config.seed`.

    With several processes (`config.num_processes`), every process builds the engine, whose
    mesh spans all their devices; process 0 schedules and sends each step to the others, which
    call `follow` (`sharding/distributed.py`).
    """

    def __init__(self, config: EngineConfig, detokenize: bool = True,
                 devices: list[jax.Device] | None = None,
                 seed_rng: np.random.Generator | None = None):
        self.config = config
        # Several processes: join JAX's distributed runtime before anything touches a device.
        distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
        if devices is None:
            devices = replica_devices(config.tensor_parallel_size, config.data_parallel_size, 0)
        self.inputs = InputProcessor(config, load_tokenizer=detokenize)
        enable_compilation_cache(config.compilation_cache_dir)
        self.model_config = self.inputs.model_config
        self.tokenizer = self.inputs.tokenizer
        self._token_texts = TokenTexts(self.tokenizer) if self.tokenizer is not None else None
        self.max_model_len = self.inputs.max_model_len
        self.dtype = _resolve_dtype(config.dtype)
        self.max_num_batched_tokens = config.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
        self.attention_backend = ops.resolve_backend(config.attention_backend)
        # Always a mesh, of one device too: one code path for every degree of parallelism.
        self.mesh = make_mesh(config.tensor_parallel_size, devices=devices)
        kv_replicas = kv_head_replicas(self.model_config.num_heads, self.model_config.num_kv_heads,
                                       config.tensor_parallel_size)
        # The model as it runs: with each KV head copied where devices outnumber them.
        self.model_config = dataclasses.replace(
            self.model_config, num_kv_heads=self.model_config.num_kv_heads * kv_replicas)

        load_format = config.load_format
        if load_format == "auto":
            load_format = ("gguf" if config.model.endswith(".gguf") else
                           "orbax" if is_orbax_checkpoint(config.model) else "safetensors")
        # Seconds spent in each startup phase, for `pjllm bench startup` and logs.
        self.startup_timings: dict[str, float] = {}
        start = time.perf_counter()
        # What the loader makes on JAX's default device (the constructor's buffers) lands on this
        # replica's first device, not on device 0, which belongs to another replica (of this
        # process's devices: with several processes the first may be another's).
        self.device = distributed.local_device(self.mesh.devices)
        with jax.default_device(self.device):
            graphdef, state = build_model(self.model_config, self.dtype, load_format, config.model,
                                          config.seed, mesh=self.mesh, kv_head_replicas=kv_replicas)
        self.startup_timings["load_weights_s"] = time.perf_counter() - start
        # What one device holds: its shard of each split parameter, and the replicated ones whole.
        weights_bytes = sum(leaf.addressable_shards[0].data.nbytes
                            for leaf in jax.tree.leaves(state))
        num_pages = config.num_pages or self._num_pages_from_memory(weights_bytes)
        if config.num_processes > 1 and not config.num_pages:
            # One cache spans the processes: each takes the smallest any of them can hold.
            from jax.experimental.multihost_utils import process_allgather
            num_pages = int(np.min(process_allgather(np.array(num_pages, np.int32))))
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
            attention=ops.AttentionBackend(self.attention_backend, self.mesh),
            max_logprobs=config.max_logprobs,
            swap_enabled=config.preemption_mode == "swap",
            # (Windowed and ALiBi layers attend without it: a model of only those has no use
            # for cascade programs.)
            cascade_attention=(config.enable_prefix_caching and not config.disable_cascade_attn
                               and self.model_config.has_full_causal_layers),
            executable_store_dir=executable_store_dir(config),
            # How and where programs are built does not change them; every other option may.
            store_context={"engine_config": dataclasses.replace(config, warmup="auto",
                                                                compilation_cache_dir=None)})
        # Several processes: the coordinator schedules and sends each step's runner calls to the
        # others (`distributed.LeaderRunner`); the others only run them (`follow`).
        self.is_follower = config.num_processes > 1 and not distributed.is_coordinator()
        if config.num_processes > 1 and not self.is_follower:
            self.model_runner = distributed.LeaderRunner(self.model_runner)
        self.kv_cache_manager = KVCacheManager(
            num_pages, config.page_size, config.enable_prefix_caching,
            sliding_window=self.model_config.uniform_sliding_window)
        self.scheduler = Scheduler(self.kv_cache_manager, config.max_num_seqs,
                                   self.max_num_batched_tokens, config.scheduling_policy,
                                   self._num_swap_pages())
        self.requests: dict[str, Request] = {}
        self._seed_rng = seed_rng if seed_rng is not None else np.random.default_rng(config.seed)
        self._next_seq_id = 0
        self._in_flight: _InFlightStep | None = None
        self.step_timings = StepTimings()
        self.closed = False
        warmup = config.warmup
        if warmup == "auto":
            warmup = "off" if jax.default_backend() == "cpu" else "background"
        if warmup != "off":
            self.model_runner.start_warmup()
        if warmup == "blocking":
            self.wait_for_warmup()
        # Startup leaves a large heap that lives as long as the engine (JAX's traces and caches,
        # imported modules); frozen, Python's full collections stop walking it on every pass.
        # In the served engine core they had cost ~15% of its time (docs/perf.md).
        gc.freeze()

    def wait_for_warmup(self) -> None:
        """Blocks until every step program of the startup warmup is compiled (at once when the
        warmup is off or done); its timings go into `startup_timings`."""
        self.startup_timings.update(self.model_runner.wait_for_warmup())
        gc.freeze()

    def _page_bytes(self) -> int:
        """Bytes of one page over all layers."""
        cfg = self.model_config
        return cfg.num_layers * ops.kv_cache_bytes_per_page(
            self.config.page_size, cfg.num_kv_heads, cfg.head_dim, self.dtype)

    def _num_swap_pages(self) -> int:
        """Pages of host memory for swap preemption: swap_space GiB ("swap" mode), else 0."""
        if self.config.preemption_mode != "swap":
            return 0
        return int(self.config.swap_space * 2**30) // self._page_bytes()

    def _num_pages_from_memory(self, weights_bytes: int) -> int:
        cfg = self.model_config
        page_bytes = self._page_bytes() // self.config.tensor_parallel_size  # split by KV head
        itemsize = jnp.dtype(self.dtype).itemsize
        # Peak activations of one step: MLP intermediates for the token budget, plus float32
        # logits (and their sort) for every sequence, plus a margin for XLA's workspace.
        activations = (self.max_num_batched_tokens * cfg.intermediate_size * itemsize * 4
                       + self.config.max_num_seqs * cfg.vocab_size * 4 * 4 + (512 << 20))
        wanted = self.config.max_num_seqs * pages_needed(self.max_model_len, self.config.page_size)
        budget = kv_cache_bytes(self.device, utilization=self.config.gpu_memory_utilization,
                                weights_bytes=weights_bytes, activation_bytes=activations,
                                host_bytes_wanted=wanted * page_bytes)
        num_pages = budget // page_bytes
        if num_pages < 1:
            raise ValueError(f"no device memory is left for the KV cache at gpu_memory_utilization "
                             f"{self.config.gpu_memory_utilization} (weights take "
                             f"{weights_bytes / 2**30:.1f} GiB); raise gpu_memory_utilization, "
                             f"free other engines (LLM.shutdown()), or give num_pages explicitly")
        return num_pages

    # ------------------------------------------------------------------ requests
    def default_sampling_params(self) -> SamplingParams:
        return self.inputs.default_sampling_params()

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    priority: int = 0) -> None:
        """Validates and queues a request; it joins the running batch at the next step.

        `request_id` must not belong to an unfinished request (a finished or aborted one's id can
        be used again). `priority` orders requests under scheduling_policy="priority" (lower
        first). Raises ValueError naming the field when the request cannot run.
        """
        self._check_open()
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string; got {type(request_id).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, token_ids, cache_salt = self.inputs.process_prompt(prompt, params)
        self.inputs.check_priority(priority)
        eos = () if params.ignore_eos else self.model_config.eos_token_ids
        request = Request(request_id, text, token_ids, params, eos_token_ids=eos,
                          cache_salt=cache_salt, priority=priority)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * len(token_ids)
        base_seed = params.seed if params.seed is not None else draw_seed(self._seed_rng)
        max_num_tokens = min(len(token_ids) + (params.max_tokens or self.max_model_len),
                             self.max_model_len)
        for index in range(params.n):
            seq = Sequence(self._next_seq_id, request, index, base_seed & 0xFFFFFFFF, list(token_ids),
                           len(token_ids), max_num_tokens)
            self._next_seq_id += 1
            if params.logprobs is not None:
                seq.logprobs = FlatLogprobs()
            start_detokenizer(seq)
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stops a request at once and frees its pages. Returns its final output (finish reason
        "abort" for the sequences that had not finished), or None if no unfinished request has
        this id. `step` never returns an output for an aborted request."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        for seq in request.seqs:
            self.scheduler.finish(seq, "abort")
        self._forget(request)
        return self._request_output(request)

    def finish_sequence(self, request_id: str, index: int, stop_reason: str) -> Request | None:
        """Ends sequence `index` of a request with finish reason "stop" (its stop string matched
        where the text is made); no-op if it has ended already. Returns the request if that
        finished it (it is forgotten then, like a request `step` reports as finished; the
        caller reports it), else None (a later step reports it)."""
        request = self.requests.get(request_id)
        if request is None or not 0 <= index < len(request.seqs):
            return None
        self.scheduler.finish(request.seqs[index], "stop", stop_reason)
        if not request.is_finished:
            return None
        self._forget(request)
        return request

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix; pages that requests hold stay theirs. True once done."""
        self._check_open()
        self.kv_cache_manager.reset_prefix_cache()
        return True

    def follow(self) -> None:
        """On a process other than the coordinator: runs the coordinator's steps on this
        process's devices until it stops, then shuts this engine down."""
        if not self.is_follower:
            raise RuntimeError("follow() is for processes other than the coordinator (process 0)")
        try:
            distributed.follow(self.model_runner)
        finally:
            self.shutdown()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ lifetime
    def shutdown(self) -> None:
        """Aborts every request, stops the background warmup and frees the device memory this
        engine holds (weights, KV cache, compiled programs) at once. Idempotent; the engine
        refuses work afterwards."""
        if self.closed:
            return
        for request_id in list(self.requests):
            self.abort_request(request_id)
        self._in_flight = None
        self.model_runner.shutdown()
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this engine was shut down; build a new LLM to generate again")

    # ------------------------------------------------------------------ the step
    def step(self, include_unfinished: bool = True) -> list[RequestOutput]:
        """Dispatches the next batch, then processes the previous one while the device works.

        Returns the state of every request whose tokens were processed in this call (with async
        scheduling those are the previous step's), or only of those that finished when
        `include_unfinished` is False. Each request's final output (finished=True) is returned
        exactly once, after which it is forgotten and its id free again. A step that fails
        finishes the requests in it with an "error: ..." finish reason; the engine goes on.
        """
        return [self._request_output(request) for request in self.step_requests(include_unfinished)]

    def step_requests(self, include_unfinished: bool = True) -> list[Request]:
        """`step`, returning the requests themselves rather than copies of their state (for a
        caller that sends only what changed, like the engine core process)."""
        self._check_open()
        start = time.perf_counter()
        wait_before = self.step_timings.wait_s
        outputs: list[Request] = []
        try:
            if self._in_flight is not None and not self.config.async_scheduling:
                previous, self._in_flight = self._in_flight, None
                outputs += self._process_or_fail(previous, include_unfinished)
            scheduled_step = self.scheduler.schedule()
            self._swap(scheduled_step)
            previous, self._in_flight = self._in_flight, None
            device_lost = False
            if scheduled_step.scheduled:
                try:
                    self._in_flight = self._dispatch(scheduled_step)
                except Exception as error:  # noqa: BLE001 - its requests get the error
                    # The runner may have applied part of the message, or none of it.
                    self.scheduler.reset_runner_batch()
                    outputs += self._fail([item.seq for item in scheduled_step.scheduled], error)
                    # A launch that failed after taking the donated KV cache leaves none.
                    device_lost = self.model_runner.device_state_lost()
            if previous is not None:
                outputs += self._process_or_fail(previous, include_unfinished)
            if device_lost:
                self._recover_device()
        except BaseException:
            # Interrupted (Ctrl-C while compiling or waiting for the device): the steps in hand
            # may be half processed, so every running sequence is recomputed from the tokens
            # the host has; what this call would have returned is lost.
            self._restart_running()
            raise
        timings = self.step_timings
        timings.steps += 1
        timings.host_s += time.perf_counter() - start - (timings.wait_s - wait_before)
        return outputs

    def _swap(self, scheduled_step: ScheduledStep) -> None:
        """Swap preemption's copies, launched before the step (device order keeps them right):
        preempted sequences' pages to host memory, then readmitted ones' back into new pages."""
        for seq, pages in scheduled_step.swap_out:
            seq.swapped_kv = self.model_runner.swap_out(pages)
        for seq, pages in scheduled_step.swap_in:
            self.model_runner.swap_in(pages, seq.swapped_kv)
            seq.swapped_kv = None

    def _dispatch(self, scheduled_step: ScheduledStep) -> "_InFlightStep":
        batch, variant = self.model_runner.prepare(scheduled_step.message)
        handle = self.model_runner.dispatch(batch, variant)
        now = time.monotonic()
        chunk_starts, samples = [], []
        for item in scheduled_step.scheduled:
            seq = item.seq
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = now
                seq.request.num_cached_tokens = seq.num_computed_tokens  # its cached prefix
            chunk_starts.append(seq.num_computed_tokens)
            samples.append(item.samples)
            seq.num_computed_tokens += item.num_new_tokens
            if samples[-1]:
                seq.add_pending_token()
        return _InFlightStep(scheduled_step.scheduled, chunk_starts, samples, handle)

    def _process_or_fail(self, step: "_InFlightStep", include_unfinished: bool) -> list[Request]:
        """Processes a dispatched step's tokens. If the device failed on it, the device state is
        rebuilt (the KV cache it was given is spoilt; every running sequence is recomputed) and
        the step's requests finish with the error."""
        try:
            result = self._fetch(step)
        except Exception as error:  # noqa: BLE001 - its requests get the error
            self._recover_device()
            return self._fail([item.seq for item in step.scheduled], error)
        return self._process(step, result, include_unfinished)

    def _fetch(self, step: "_InFlightStep") -> StepResult:
        start = time.perf_counter()
        try:
            return self.model_runner.fetch(step.handle)
        finally:
            self.step_timings.wait_s += time.perf_counter() - start

    def _process(self, step: "_InFlightStep", result: StepResult,
                 include_unfinished: bool) -> list[Request]:
        outputs = []
        touched: dict[Request, None] = {}  # by identity: an id may be reused once finished
        cursor = 0
        # Python values once per step: indexing numpy arrays row by row costs more than this.
        tokens = result.sampled.token_ids.tolist()
        token_logprobs = result.sampled.logprobs.logprobs.tolist()
        for row, (item, chunk_start, samples) in enumerate(zip(step.scheduled, step.chunk_starts,
                                                               step.samples)):
            seq = item.seq
            cursor += item.num_new_tokens
            if seq.is_finished:  # stopped, aborted or failed after this step was dispatched
                continue
            touched[seq.request] = None
            try:
                if result.prompt_logprobs is not None:
                    self._record_prompt_logprobs(seq, chunk_start, item.num_new_tokens,
                                                 cursor - item.num_new_tokens, result.prompt_logprobs)
                if samples:
                    self._append_token(seq, row, tokens[row], token_logprobs[row], result.sampled)
            except Exception as error:  # noqa: BLE001 - e.g. detokenizing; its request gets it
                del touched[seq.request]
                outputs += self._fail([seq], error)
        for request in touched:
            finished = request.is_finished
            if finished or include_unfinished:
                outputs.append(request)
            if finished:
                self._forget(request)
        return outputs

    def _fail(self, seqs: list[Sequence], error: Exception) -> list[Request]:
        """Finishes the requests of `seqs` with `error` as finish reason; returns them."""
        requests = {seq.request: None for seq in seqs if not seq.is_finished}
        logger.error("a step failed; finishing requests %s with the error",
                     [request.request_id for request in requests], exc_info=error)
        reason = f"error: {type(error).__name__}: {error}"
        # Pages cached for a step that failed may never have been written.
        self.kv_cache_manager.reset_prefix_cache()
        for request in requests:
            for seq in request.seqs:
                self.scheduler.finish(seq, reason)
            self._forget(request)
        return list(requests)

    def _restart_running(self) -> None:
        """Forgets the step in flight and sends every running sequence back to be recomputed
        (its sampled tokens are kept; sampling keys depend only on the seed and token count,
        so it continues exactly as it would have). Tokens still on the device are dropped, and
        the runner's batch is emptied: it may be halfway through a message."""
        self._in_flight = None
        for seq in list(reversed(self.scheduler.running)):  # newest first: the oldest ends up in front
            self.scheduler.preempt(seq, allow_swap=False)
        self.scheduler.drop_swapped()  # what went to host memory may never have been read
        for seq in self.scheduler.waiting:
            seq.drop_pending_tokens()
        self.scheduler.reset_runner_batch()
        # The step in flight, which filled cached pages, may not have run (or its KV is gone).
        self.kv_cache_manager.reset_prefix_cache()

    def _recover_device(self) -> None:
        """After a step failed on the device: fresh KV cache, every running sequence recomputed."""
        self._restart_running()
        self.model_runner.reset_device_state()

    def _forget(self, request: Request) -> None:
        """Drops a finished request, by identity: its id may already name a new request."""
        if self.requests.get(request.request_id) is request:
            del self.requests[request.request_id]

    def _record_prompt_logprobs(self, seq: Sequence, start: int, num_tokens: int, cursor: int,
                                logprobs: TokenLogprobs) -> None:
        """Records the logprobs of the prompt tokens this chunk predicts (its rows start at
        `cursor` in the step's token rows)."""
        request = seq.request
        if request.prompt_logprobs is None or seq.sample_index != 0:
            return
        stop = min(start + num_tokens, seq.num_prompt_tokens - 1)
        for position in range(start, stop):
            request.record_prompt_logprobs(position + 1, self._logprob_entry(
                seq.token_ids[position + 1], logprobs, cursor + position - start,
                request.params.prompt_logprobs))

    def _logprob_entry(self, token: int, logprobs: TokenLogprobs, row: int,
                       num: int) -> dict[int, Logprob]:
        """{token: its Logprob, then each of the row's top `num` tokens: theirs}."""
        entry = FlatLogprobs()
        self._append_logprobs(entry, token, logprobs, row, num)
        return entry[0]

    def _append_logprobs(self, out: FlatLogprobs, token: int, logprobs: TokenLogprobs, row: int,
                         num: int) -> None:
        out.append_sample(token, float(logprobs.logprobs[row]), int(logprobs.ranks[row]),
                          logprobs.top_ids[row, :num].tolist(),
                          logprobs.top_logprobs[row, :num].tolist(), self._token_texts)

    def _append_token(self, seq: Sequence, row: int, token: int, logprob: float,
                      sampled: SamplerOutput) -> None:
        """Records the token `seq` sampled in row `row` of a step (with its logprob; `sampled`
        holds the row's top logprobs)."""
        seq.resolve_pending_token(token)
        request = seq.request
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        seq.cumulative_logprob += logprob
        params = request.params
        if seq.logprobs is not None:
            self._append_logprobs(seq.logprobs, token, sampled.logprobs, row, params.logprobs)
        new_text_len = len(decode_new_text(self.tokenizer, seq)) if self.tokenizer is not None else 0

        past_min = seq.num_resolved_tokens - seq.num_prompt_tokens >= params.min_tokens
        if past_min and token in request.eos_token_ids:
            self.scheduler.finish(seq, "stop")
        elif past_min and token in params.stop_token_ids:
            self.scheduler.finish(seq, "stop", token)
        elif (stop := find_stop_string(seq, new_text_len)) is not None:
            self.scheduler.finish(seq, "stop", stop)
        elif seq.num_resolved_tokens >= seq.max_num_tokens:
            self.scheduler.finish(seq, "length")

    def _request_output(self, request: Request) -> RequestOutput:
        completions = [CompletionOutput(
            index=seq.sample_index, text=seq.text, token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            logprobs=seq.logprobs.snapshot() if seq.logprobs is not None else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
            for seq in request.seqs]
        metrics = RequestMetrics(request.arrival_time, request.first_scheduled_time,
                                 request.first_token_time)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             request.prompt_logprobs, completions, request.is_finished, metrics,
                             request.num_cached_tokens)

    def run_to_completion(self, progress=None) -> dict[str, RequestOutput]:
        """Steps until nothing is left; returns each request's final output by id."""
        finished: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for output in self.step(include_unfinished=False):
                if output.finished:
                    finished[output.request_id] = output
                    if progress is not None:
                        progress.update(1)
        return finished
