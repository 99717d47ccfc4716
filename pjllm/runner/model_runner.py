"""The model runner: pads a scheduled batch into a bucket and runs the step's programs on device.

A step is two jitted programs, and a third when prompt logprobs are asked for: the forward
(embedding, layers, paged attention, the logits of each sequence's last token; one per token
bucket T), the sampler (one per sequence bucket N and `SamplerFlags`), and the prompt logprobs
(the logits of every token; one per token bucket). Only sampled token ids and requested logprobs
come back to the host. Shapes are fixed per bucket; real counts and per-request options are array
data, and the few sampler variants are a fixed set, so every program can be built at startup and
no request's settings compile anything at serving time. The KV pages are donated: the cache is
updated in place. `dispatch` returns before the device finishes, and a step may read the previous
step's sampled tokens on device, so the host can prepare step N+1 while step N runs. The
programs' functions and the step's inputs are in `runner/step.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pjllm.config import ModelConfig
from pjllm.kernels import ops
from pjllm.kernels.attention_metadata import AttentionMetadata
from pjllm.kernels.ops import AttentionBackend
from pjllm.runner.executable_store import ExecutableStore
from pjllm.runner.swap import SwappedPages, pad_pages, read_swapped, write_swapped
from pjllm.runner.input_batch import InputBatch, SampledRows
from pjllm.runner.programs import ProgramCache
from pjllm.runner.sampler import (BISECT_THRESHOLDS, DEFAULT_BISECT_THRESHOLDS, SORT_FREE_TOP_K,
                                  SamplerFlags, SamplerOutput, SamplingMetadata, TokenLogprobs,
                                  few_searched_rows)
from pjllm.runner.packing import abstract_buffers, layout_of, pack
from pjllm.runner.step import (STEP_COMPILER_OPTIONS, StepInput, StepVariant, dummy_batch,
                               forward_compiler_options, forward_from_buffers, matmul_precision,
                               run_prompt_logprobs, sampler_from_buffer, write_block_table)
from pjllm.scheduler_output import SchedulerOutput
from pjllm.sharding import kv_cache_sharding, replicated


# The smallest token bucket, by JAX platform. On a GPU a step of up to 256 tokens is bound by
# reading the weights, so a 1-token decode padded to 16 costs what 1 token costs; a CPU's
# matmuls are compute-bound from the first token, and the same padding made a batch-1 decode
# step do 16 tokens of work (docs/perf.md, CPU).
SMALLEST_TOKEN_BUCKET = {"cpu": 1}
DEFAULT_SMALLEST_TOKEN_BUCKET = 16

# Cascade attention runs when a step's sequences all begin with the same pages, at least
# MIN_CASCADE_PREFIX_TOKENS of them, and sequences x prefix tokens (the prefix reads it saves)
# reach MIN_CASCADE_SHARED_TOKENS. On an H200 (Llama-3-8B heads, docs/perf.md) decode
# attention broke even at 64 sequences sharing 1,024 tokens and at 128 sharing 256; 256
# sequences sharing 256 tokens ran 8% faster, 96 sharing 1,024 46% faster.
MIN_CASCADE_PREFIX_TOKENS = 256
MIN_CASCADE_SHARED_TOKENS = 65536

# Block table entries written on device per call of the table program (one program, called
# as often as a step's changes need: a decode step of 1,024 sequences changes about 64 entries;
# a prompt that finds 128k tokens cached, 8,192).
TABLE_WRITES_PER_CALL = 1024


def token_bucket_sizes(max_tokens: int, smallest: int = DEFAULT_SMALLEST_TOKEN_BUCKET) -> list[int]:
    """The padded token counts a step can take, from `smallest` up to `max_tokens`.

    Powers of two up to 256, then four sizes per octave (x1, x1.25, x1.5, x1.75). Below 256
    tokens a step is bound by reading the weights, so padding costs little; above it the
    matmuls are compute-bound and padding costs in proportion, so the ladder is finer there
    (at most 25% padding, against 100% for powers of two).
    """
    sizes, size = [], smallest
    while size < min(256, max_tokens):
        sizes.append(size)
        size *= 2
    octave = 256
    while octave < max_tokens:
        sizes.extend(octave * quarters // 4 for quarters in (4, 5, 6, 7)
                     if octave * quarters // 4 < max_tokens)
        octave *= 2
    return sorted(set(sizes)) + [max_tokens]


def _bucket(value: int, buckets: list[int]) -> int:
    for size in buckets:
        if size >= value:
            return size
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass
class StepHandle:
    """Device outputs of a dispatched step, not yet waited for, and the batch rows whose
    sampled tokens they hold."""

    sampled: SamplerOutput
    prompt_logprobs: TokenLogprobs | None
    sampled_rows: SampledRows


@dataclasses.dataclass
class StepResult:
    """Host copies of one step's outputs (rows follow the scheduled order)."""

    sampled: SamplerOutput
    prompt_logprobs: TokenLogprobs | None


def _abstract(tree: Any) -> Any:
    """The shapes, dtypes and shardings (of device arrays) of a pytree of arrays, holding no
    memory."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                       sharding=getattr(a, "sharding", None)), tree)


class ModelRunner:
    """Owns the weights, the KV cache and the compiled step programs.

    Nothing but the runner's own fields refers to its device arrays (the jitted step is a pure
    function, and programs are lowered from abstract shapes), so dropping the runner frees its
    memory, and `shutdown` frees it at once.
    """

    def __init__(self, model_config: ModelConfig, graphdef: nnx.GraphDef, state: nnx.State,
                 num_pages: int, page_size: int, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int, dtype: Any, attention: AttentionBackend,
                 max_logprobs: int, swap_enabled: bool = False, cascade_attention: bool = False,
                 executable_store_dir: str | None = None,
                 store_context: dict[str, Any] | None = None):
        """`executable_store_dir`: the folder where compiled programs are kept for the next
        process (runner/executable_store.py; None: none kept); `store_context`: what else the
        programs may depend on that the runner is not given (the engine's configuration),
        part of every stored program's key."""
        self.model_config = model_config
        self.attention = attention  # its mesh holds the weights, the KV cache and every step
        self.swap_enabled = swap_enabled  # whether the warmup builds the swap programs
        # Whether steps whose sequences all begin with the same pages run cascade attention.
        self.cascade_attention = cascade_attention
        # One K for every step that returns top logprobs (each request's own count is sliced on
        # the host), so the logprob count of a request selects no program.
        self.num_logprobs = min(max_logprobs, model_config.vocab_size)
        self.weights, state_treedef = jax.tree.flatten(state)
        self.dtype = dtype
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.max_num_seqs = max_num_seqs
        self.token_buckets = token_bucket_sizes(
            max_num_batched_tokens,
            SMALLEST_TOKEN_BUCKET.get(jax.default_backend(), DEFAULT_SMALLEST_TOKEN_BUCKET))
        self.bisect_thresholds = BISECT_THRESHOLDS.get(jax.default_backend(),
                                                       DEFAULT_BISECT_THRESHOLDS)
        self.input_batch = InputBatch(max_num_seqs, self.max_pages_per_seq, model_config.vocab_size)
        # The rows that sample in the step prepared last: its handle records their tokens.
        self._sampled_rows: SampledRows | None = None
        # The block table entries that step changed, written on device before it runs.
        self._table_writes = np.zeros(0, np.int32), np.zeros(0, np.int32)
        # Whole on every device of the mesh: the step's inputs and small state, the forward's
        # logits and hidden states (built once: dispatch uses it every step).
        self._replicated = replicated(attention.mesh) if attention.mesh is not None else None
        self.reset_device_state()
        precision = matmul_precision(dtype)
        model_statics = dict(graphdef=graphdef, state_treedef=state_treedef, precision=precision)
        forward_fn = functools.partial(forward_from_buffers, attention=attention, **model_statics)
        # The forward of each token bucket: one jit per set of XLA options, which differ by
        # bucket size (forward_compiler_options).
        jits: dict[tuple, Any] = {}
        forwards = {}
        for size in self.token_buckets:
            options = forward_compiler_options(size)
            key = tuple(sorted(options.items()))
            if key not in jits:
                jits[key] = jax.jit(forward_fn, static_argnames=("layout",),
                                    donate_argnames=("kv_caches", "page_tokens"),
                                    compiler_options=options)
            forwards[size] = jits[key]
        sampler = jax.jit(functools.partial(sampler_from_buffer, page_size=page_size),
                          static_argnames=("layout", "flags"))
        table_writes = jax.jit(write_block_table, donate_argnames=("block_table",))
        prompt_logprobs = jax.jit(
            functools.partial(run_prompt_logprobs, num_logprobs=self.num_logprobs, **model_statics),
            compiler_options=STEP_COMPILER_OPTIONS)
        swap_out = jax.jit(functools.partial(read_swapped, page_size=page_size))
        swap_in = jax.jit(functools.partial(write_swapped, page_size=page_size),
                          donate_argnames=("kv_caches", "page_tokens"))
        # Abstract shapes only: the lowering closure (which the warmup thread holds) must keep
        # no device array, and no reference to the runner, alive.
        weights, kv_caches, page_tokens, last_tokens, block_table = _abstract(
            (self.weights, self.kv_caches, self.page_tokens, self.last_tokens, self.block_table))
        vocab, hidden_size = model_config.vocab_size, model_config.hidden_size
        whole = self._replicated

        def program_inputs(key: tuple) -> tuple[Any, tuple, dict[str, Any]]:
            """The jitted function of `key`'s program and the abstract arguments and static
            keyword arguments it is lowered with. Keys: ("table_writes", U), ("forward", T),
            ("forward", T, "cascade"), ("sampler", N, flags), ("prompt_logprobs", T),
            ("swap_out", B) and ("swap_in", B) (B pages, a power of two)."""
            kind, size = key[0], key[1]
            if kind == "table_writes":
                writes = jax.ShapeDtypeStruct((size,), jnp.int32)
                return table_writes, (block_table, writes, writes), {}
            if kind == "forward":
                layout = layout_of(dummy_batch(size, seq_bucket(size, max_num_seqs),
                                               cascade="cascade" in key))
                return forwards[size], (weights, kv_caches, page_tokens, last_tokens, block_table,
                                 *abstract_buffers(layout)), {"layout": layout}
            if kind == "sampler":
                layout = layout_of(dummy_batch(size, size))
                logits = jax.ShapeDtypeStruct((size, vocab), jnp.float32, sharding=whole)
                return sampler, (logits, last_tokens, page_tokens, block_table,
                                 abstract_buffers(layout)[1]), {"layout": layout, "flags": key[2]}
            if kind == "prompt_logprobs":
                hidden = jax.ShapeDtypeStruct((size, hidden_size), dtype, sharding=whole)
                return prompt_logprobs, (weights, hidden,
                                         jax.ShapeDtypeStruct((size,), jnp.int32)), {}
            pages = jax.ShapeDtypeStruct((size,), jnp.int32)
            if kind == "swap_out":
                return swap_out, (kv_caches, page_tokens, pages), {}
            if kind == "swap_in":
                kv, tokens = jax.eval_shape(swap_out, kv_caches, page_tokens, pages)
                return swap_in, (kv_caches, page_tokens, pages, kv, tokens), {}
            raise ValueError(f"unknown step program {key!r}")

        def lower(key: tuple) -> jax.stages.Lowered:
            program, args, kwargs = program_inputs(key)
            return program.lower(*args, **kwargs)

        def signature(key: tuple) -> tuple:
            _, args, kwargs = program_inputs(key)
            return args, kwargs

        store = None
        if executable_store_dir is not None:
            # Everything the programs' functions captured, beside their inputs (`signature`).
            captured = dict(
                model_config=model_config, graphdef=graphdef, dtype=jnp.dtype(dtype).name,
                precision=precision, page_size=page_size, num_pages=num_pages,
                max_pages_per_seq=self.max_pages_per_seq, max_num_seqs=max_num_seqs,
                num_logprobs=self.num_logprobs, token_buckets=self.token_buckets,
                bisect_thresholds=self.bisect_thresholds, attention_kernels=attention.kernels,
                mesh=(attention.mesh, None if attention.mesh is None
                      else [d.id for d in attention.mesh.devices.flat]),
                compiler_options=STEP_COMPILER_OPTIONS,
                forward_compiler_options={size: forward_compiler_options(size)
                                          for size in self.token_buckets})
            store = ExecutableStore(executable_store_dir,
                                    {**(store_context or {}), "runner": captured},
                                    signature=signature, describe=_describe_program)
        self.programs = ProgramCache(lower, describe=_describe_program, store=store)
        # Dropped without shutdown (its last reference gone), the runner stops its warmup too.
        weakref.finalize(self, self.programs.close, wait=False)

    def reset_device_state(self) -> None:
        """Fresh (zeroed) KV pages and sampled-token buffer, e.g. after a step failed on device
        and left the donated ones unusable. The persistent batch is the scheduler's to reset
        (its next message has `reset_batch`): its sequences' KV must be recomputed."""
        cfg, mesh = self.model_config, self.attention.mesh
        kv_sharding = kv_cache_sharding(mesh) if mesh is not None else None
        whole = self._replicated
        self.kv_caches = [ops.allocate_kv_pages(self.num_pages, self.page_size, cfg.num_kv_heads,
                                                cfg.head_dim, self.dtype, kv_sharding)
                          for _ in range(cfg.num_layers)]
        # The last sampled token of every row, kept on device so the next step can read tokens
        # the host has not seen yet (async scheduling). Fixed size, so it adds no compiled shapes.
        self.last_tokens = jnp.zeros(self.max_num_seqs, jnp.int32, device=whole)
        # The token id of every KV slot (4 bytes beside each token's KV): the penalties' history.
        self.page_tokens = jnp.zeros(self.num_pages * self.page_size, jnp.int32, device=whole)
        # Every row's pages (the persistent batch's block_tables, row R the padding row's
        # zeros), kept here so a step sends only the entries that changed: its width,
        # max_model_len / page_size, would otherwise cost host time and transfer every step.
        self.block_table = jnp.zeros((self.max_num_seqs + 1, self.max_pages_per_seq), jnp.int32,
                                     device=whole)
        # Swapped-out pages still on the device, moved to the host at the next fetch.
        self._swaps_on_device: list[SwappedPages] = []

    def device_state_lost(self) -> bool:
        """Whether the KV cache is gone: donated to a step launch that then failed."""
        return (any(pages.is_deleted() for pages in self.kv_caches)
                or self.page_tokens.is_deleted() or self.block_table.is_deleted())

    def shutdown(self) -> None:
        """Stops the warmup, drops the compiled programs and frees the weights and KV cache."""
        self.programs.close()
        for array in jax.tree.leaves((self.weights, self.kv_caches, self.last_tokens,
                                      self.page_tokens, self.block_table)):
            array.delete()
        self.weights = self.kv_caches = self.last_tokens = self.page_tokens = None
        self.block_table = None

    # ---------------------------------------------------------------- host side
    def buckets(self) -> list[tuple[int, int]]:
        """Every (token bucket T, sequence bucket N) a step can be padded to.

        N is tied to T (a batch of T tokens holds at most T sequences), so there is one program
        per token bucket: a few seconds of compile each for an 8B model, not tens of programs.
        """
        return [(tokens, self.seq_bucket(tokens)) for tokens in self.token_buckets]

    def seq_bucket(self, padded_tokens: int) -> int:
        """The sequence bucket N of token bucket T: at most one sequence per token."""
        return seq_bucket(padded_tokens, self.max_num_seqs)

    def prepare(self, message: SchedulerOutput) -> tuple[StepInput, StepVariant]:
        """Applies the scheduler's message to the persistent batch, then lays out the n rows it
        schedules as one padded ragged batch (host numpy arrays), which the next `dispatch`
        launches."""
        input_batch = self.input_batch
        input_batch.apply(message)
        rows = input_batch.rows(message.scheduled_seq_ids)  # [n]
        counts = np.array(message.num_scheduled_tokens, np.int32)  # [n]
        num_seqs, num_tokens = len(rows), int(counts.sum())
        padded_tokens = _bucket(num_tokens, self.token_buckets)
        padded_seqs = self.seq_bucket(padded_tokens)
        padded_rows = np.full(padded_seqs, input_batch.padding_row, np.int64)
        padded_rows[:num_seqs] = rows

        start = input_batch.num_computed_tokens[rows]  # [n] each chunk's first position
        stop = start + counts
        ends = np.cumsum(counts)  # [n] where each chunk ends among the step's tokens
        token_seq = np.repeat(np.arange(num_seqs), counts)  # [num_tokens] the chunk of each token
        pos = start[token_seq] + np.arange(num_tokens) - (ends - counts)[token_seq]
        page_size = self.page_size
        positions = np.zeros(padded_tokens, np.int32)
        positions[:num_tokens] = pos
        slot_mapping = np.full(padded_tokens, -1, np.int32)
        slot_mapping[:num_tokens] = (input_batch.block_tables[rows[token_seq], pos // page_size]
                                     * page_size + pos % page_size)

        # A newest token sampled by the step prepared last may not be on the host yet: the chunk
        # that ends with it reads it on device, from that step's outputs.
        token_ids = np.zeros(padded_tokens, np.int32)
        last_token_rows = np.full(padded_tokens, -1, np.int32)
        on_device = input_batch.sampled_by_last_step(rows)
        last_token_rows[ends[on_device] - 1] = input_batch.sampled_at_row[rows[on_device]]
        # The rest comes from the host: prefill chunks, and decodes of a token fetched already
        # (the engine fetches step k before it prepares step k + 2).
        for i in np.flatnonzero((counts > 1) | ~on_device).tolist():
            known = input_batch.token_ids[rows[i]]
            first, last = int(start[i]), int(stop[i]) - int(on_device[i])
            assert last <= len(known), (
                f"sequence {message.scheduled_seq_ids[i]}: token {last - 1} is not on the host, "
                f"nor in the outputs of the step prepared last")
            cursor = ends[i] - counts[i]
            token_ids[cursor:cursor + last - first] = known[first:last]

        prompt_lens = input_batch.num_prompt_tokens[rows]
        prompt_targets = np.full(padded_tokens, -1, np.int32)
        wants_prompt = input_batch.wants_prompt_logprobs[rows] & (start < prompt_lens - 1)
        for i in np.flatnonzero(wants_prompt).tolist():
            first, last = int(start[i]), min(int(stop[i]), int(prompt_lens[i]) - 1)
            cursor = ends[i] - counts[i]
            prompt_targets[cursor:cursor + last - first] = input_batch.token_ids[rows[i]][first + 1:last + 1]

        query_start_loc = np.full(padded_seqs + 1, num_tokens, np.int32)
        query_start_loc[0] = 0
        query_start_loc[1:num_seqs + 1] = ends
        seq_lens = np.zeros(padded_seqs, np.int32)
        seq_lens[:num_seqs] = stop
        logits_indices = np.zeros(padded_seqs, np.int32)
        logits_indices[:num_seqs] = ends - 1
        sampling, sampler_flags = self._sampling_metadata(rows, padded_rows)
        step_input = StepInput(
            token_ids=token_ids, last_token_rows=last_token_rows, positions=positions,
            seq_rows=padded_rows.astype(np.int32),
            attention=AttentionMetadata(slot_mapping=slot_mapping, query_start_loc=query_start_loc,
                                        seq_lens=seq_lens, block_tables=None,
                                        common_prefix_len=self._common_prefix_len(
                                            rows, start, padded_tokens)),
            logits_indices=logits_indices, sampling=sampling, prompt_logprob_targets=prompt_targets)
        self._sampled_rows = input_batch.advance(rows, counts)
        self._table_writes = input_batch.take_table_writes()
        return step_input, StepVariant(sampler_flags, bool(wants_prompt.any()))

    def _common_prefix_len(self, rows: np.ndarray, start: np.ndarray,
                           padded_tokens: int) -> np.ndarray | None:
        """The tokens of the longest run of pages that begins the block table of every row
        scheduled (`rows`, whose chunks start at positions `start`), up to the first position
        any of them computes now: for cascade attention. None where that would not pay (too few
        rows or tokens), cascade attention is off, or its program is still being compiled."""
        page_size = self.page_size
        limit = int(start.min()) // page_size
        if not self.cascade_attention or not _cascade_pays(len(rows), limit * page_size):
            return None
        tables = self.input_batch.block_tables[rows, :limit]  # [n, limit]
        if not (tables[:, 0] == tables[0, 0]).all():  # the usual answer, from one column
            return None
        same = (tables == tables[0]).all(axis=0)
        pages = limit if same.all() else int(same.argmin())
        if (not _cascade_pays(len(rows), pages * page_size)
                or not self.programs.is_available(("forward", padded_tokens, "cascade"))):
            return None
        return np.int32(pages * page_size)

    def _sampling_metadata(self, rows: np.ndarray,
                           padded_rows: np.ndarray) -> tuple[SamplingMetadata, SamplerFlags]:
        """The sampler's inputs for `padded_rows` (the step's rows, then padding), and the
        sampler program that the step's rows (`rows`) need."""
        batch = self.input_batch
        filtered = batch.filters[rows]
        penalties = bool(batch.uses_penalties[rows].any())
        top_k = batch.top_k[rows][filtered]
        beyond = (top_k <= 0) | (top_k > SORT_FREE_TOP_K)  # rows the largest logits cannot serve
        few = few_searched_rows(len(padded_rows))
        if not filtered.any():
            method = "sort"  # unused: the filter is off
        elif not beyond.any():
            method = "top_k_prefix"
        elif not self.bisect_thresholds:
            method = "sort"
        elif (top_k[beyond] > 0).any():
            method = "bisect"
        elif beyond.sum() <= few and not penalties:
            method = "nucleus_few"  # top_p alone (a top_k of the vocabulary is 0 here)
        else:
            method = "nucleus"
        flags = SamplerFlags(use_top_k_top_p=bool(filtered.any()), threshold_method=method,
                             use_penalties=penalties, num_logprobs=self.num_logprobs)
        search_rows = np.full(few, len(padded_rows), np.int32)
        if method == "nucleus_few":
            found = np.flatnonzero(filtered)[beyond]  # positions among `rows`, as in padded_rows
            search_rows[:len(found)] = found
        # Generated so far, counting tokens still in flight: the sampling key's step.
        step = batch.num_tokens[padded_rows] - batch.num_prompt_tokens[padded_rows]
        short = step < batch.min_tokens[padded_rows]
        metadata = SamplingMetadata(
            temperature=batch.temperature[padded_rows], top_k=batch.top_k[padded_rows],
            top_p=batch.top_p[padded_rows], min_p=batch.min_p[padded_rows],
            presence_penalty=batch.presence_penalty[padded_rows],
            frequency_penalty=batch.frequency_penalty[padded_rows],
            repetition_penalty=batch.repetition_penalty[padded_rows],
            seeds=batch.seeds[padded_rows], sample_index=batch.sample_index[padded_rows], step=step,
            prompt_lens=batch.num_prompt_tokens[padded_rows],
            banned_token_ids=np.where(short[:, None], batch.banned_while_short[padded_rows],
                                      np.int32(-1)),
            search_rows=search_rows)
        return metadata, flags

    def dispatch(self, batch: StepInput, variant: StepVariant) -> "StepHandle":
        """Launches the programs of the step `prepare` made last on device and returns at once
        (JAX dispatch is asynchronous), once they are compiled."""
        tokens, seqs = batch.token_ids.shape[0], batch.logits_indices.shape[0]
        cascade = ("cascade",) if batch.attention.common_prefix_len is not None else ()
        forward = self.programs.get(("forward", tokens, *cascade))
        sampler = self.programs.get(("sampler", seqs, variant.sampler))
        prompt_program = (self.programs.get(("prompt_logprobs", tokens))
                          if variant.prompt_logprobs else None)
        # One copy, though several programs read it; straight onto the mesh's devices (another
        # data-parallel replica's mesh may hold the default device).
        token_buffer, sequence_buffer = jax.device_put(pack(batch), self._replicated)
        self._write_block_table()
        logits, hidden, self.kv_caches, self.page_tokens = forward(
            self.weights, self.kv_caches, self.page_tokens, self.last_tokens, self.block_table,
            token_buffer, sequence_buffer)
        sampled, self.last_tokens = sampler(logits, self.last_tokens, self.page_tokens,
                                            self.block_table, sequence_buffer)
        prompt = None
        if prompt_program is not None:
            prompt = prompt_program(self.weights, hidden,
                                    jax.device_put(batch.prompt_logprob_targets, self._replicated))
        return StepHandle(sampled, prompt, self._sampled_rows)

    def _write_block_table(self) -> None:
        """Applies the block table entries the step prepared last changed to the device's
        copy, TABLE_WRITES_PER_CALL at a time (padding indices lie past the table: dropped)."""
        indices, page_ids = self._table_writes
        self._table_writes = np.zeros(0, np.int32), np.zeros(0, np.int32)
        if not len(indices):
            return
        program = self.programs.get(("table_writes", TABLE_WRITES_PER_CALL))
        calls = -(-len(indices) // TABLE_WRITES_PER_CALL)
        padded = calls * TABLE_WRITES_PER_CALL
        indices = np.pad(indices, (0, padded - len(indices)), constant_values=self.block_table.size)
        page_ids = np.pad(page_ids, (0, padded - len(page_ids)))
        for call in range(calls):
            part = slice(call * TABLE_WRITES_PER_CALL, (call + 1) * TABLE_WRITES_PER_CALL)
            self.block_table = program(self.block_table, indices[part], page_ids[part])

    def fetch(self, handle: "StepHandle") -> StepResult:
        """Waits for a dispatched step and copies its (small) outputs to the host, where the
        persistent batch records the sampled tokens; pages swapped out before it move to the
        host now too (they were read before this step ran)."""
        sampled, prompt = jax.device_get((handle.sampled, handle.prompt_logprobs))
        self.input_batch.record_sampled(handle.sampled_rows, sampled.token_ids)
        for swapped in self._swaps_on_device:
            swapped.kv, swapped.page_tokens = jax.device_get((swapped.kv, swapped.page_tokens))
        self._swaps_on_device = []
        return StepResult(sampled, prompt)

    def swap_out(self, pages: list[int]) -> SwappedPages:
        """Copies KV pages `pages` off the device (launched now, before any later step can
        overwrite them; in host memory after the next fetch)."""
        padded = pad_pages(pages, pages[0])
        kv, tokens = self.programs.get(("swap_out", len(padded)))(self.kv_caches, self.page_tokens,
                                                                   padded)
        for array in (*kv, tokens):
            array.copy_to_host_async()
        swapped = SwappedPages(kv, tokens, len(pages))
        self._swaps_on_device.append(swapped)
        return swapped

    def swap_in(self, pages: list[int], swapped: SwappedPages) -> None:
        """Writes `swapped` into KV pages `pages` (as many as it holds), before the next step."""
        assert len(pages) == swapped.num_pages, (len(pages), swapped.num_pages)
        padded = pad_pages(pages, self.num_pages)  # padding ids past the last page: dropped
        self.kv_caches, self.page_tokens = self.programs.get(("swap_in", len(padded)))(
            self.kv_caches, self.page_tokens, padded, swapped.kv, swapped.page_tokens)

    def program_keys(self) -> list[tuple]:
        """Every program a step can need, in the order the warmup builds them: the block table
        writes, the forward and the plain sampler of each bucket, smallest first (enough to serve), then the other
        sampler variants, then the prompt logprobs programs, then the cascade attention forwards
        (used once built), then (swap preemption on) the swap programs of every padded page
        count a sequence can hold."""
        seq_buckets = sorted({seqs for _, seqs in self.buckets()})
        variants = SamplerFlags.all_variants(self.num_logprobs, self.bisect_thresholds)
        default = variants[0]  # plain sampling, which also serves greedy rows
        keys = [("table_writes", TABLE_WRITES_PER_CALL)]
        for tokens, seqs in self.buckets():
            keys += [("forward", tokens), ("sampler", seqs, default)]
        keys += [("sampler", seqs, flags) for seqs in seq_buckets for flags in variants
                 if flags != default]
        keys += [("prompt_logprobs", tokens) for tokens in self.token_buckets]
        if self.cascade_attention:
            max_len = self.max_pages_per_seq * self.page_size
            keys += [("forward", tokens, "cascade") for tokens, seqs in self.buckets()
                     if _cascade_pays(seqs, max_len)]
        if self.swap_enabled:
            sizes = [1 << i for i in range((self.max_pages_per_seq - 1).bit_length() + 1)]
            keys += [(kind, size) for size in sizes for kind in ("swap_out", "swap_in")]
        return list(dict.fromkeys(keys))

    def start_warmup(self) -> None:
        """Starts compiling every program of `program_keys` in the background; returns at once."""
        self.programs.warm(self.program_keys())

    def wait_for_warmup(self) -> dict[str, float]:
        """Blocks until the warmup's programs are compiled; returns its {"lower_s", "compile_s"}."""
        return self.programs.wait_for_warmup()


def _cascade_pays(num_seqs: int, prefix_len: int) -> bool:
    """Whether num_seqs sequences sharing prefix_len tokens are worth cascade attention."""
    return (prefix_len >= MIN_CASCADE_PREFIX_TOKENS
            and num_seqs * prefix_len >= MIN_CASCADE_SHARED_TOKENS)


def seq_bucket(padded_tokens: int, max_num_seqs: int) -> int:
    """The sequence bucket N of token bucket T: at most one sequence per token."""
    return min(padded_tokens, max_num_seqs)


def _describe_program(key: tuple) -> str:
    kind, size, *flags = key
    unit = {"sampler": "N", "swap_out": "B", "swap_in": "B", "table_writes": "U"}.get(kind, "T")
    return f"{kind} {unit}={size}{''.join(f' {f}' for f in flags)}"
