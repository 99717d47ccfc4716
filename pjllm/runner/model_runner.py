"""The model runner: pads a scheduled batch into a bucket and runs the jitted step on device.

One jitted `step` does everything numeric (embedding, layers, paged attention, sampling); only
sampled token ids and requested logprobs come back to the host. Shapes are fixed per bucket
(token count T, sequence count N); real counts are array data, so a new batch never recompiles.
The KV pages are donated: the cache is updated in place.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pjllm.config import ModelConfig
from pjllm.engine.scheduler import ScheduledSeq
from pjllm.kernels import ops
from pjllm.kernels.attention_metadata import AttentionMetadata
from pjllm.models.llama import LlamaForCausalLM
from pjllm.runner.sampler import SamplerFlags, SamplerOutput, SamplingMetadata, compute_logprobs, sample

logger = logging.getLogger(__name__)


def _powers_of_two(low: int, high: int) -> list[int]:
    sizes, size = [], low
    while size < high:
        sizes.append(size)
        size *= 2
    return sizes + [high]


def _bucket(value: int, buckets: list[int]) -> int:
    for size in buckets:
        if size >= value:
            return size
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


def _padded(lists: list[list[int]], rows: int, width: int) -> np.ndarray:
    out = np.full((rows, width), -1, np.int32)
    for i, values in enumerate(lists):
        out[i, :len(values)] = values
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInput:
    """One step's device inputs (T = token bucket, N = sequence bucket).

    token_ids, positions:   i32[T]
    attention:              the ragged batch layout (AttentionMetadata)
    logits_indices:         i32[N] index into T of each sequence's last query token
    sampling:               SamplingMetadata, per sequence
    prompt_logprob_targets: i32[T] next prompt token of each token (only read when prompt
                            logprobs are requested; -1 where there is none)
    """

    token_ids: jax.Array
    positions: jax.Array
    attention: AttentionMetadata
    logits_indices: jax.Array
    sampling: SamplingMetadata
    prompt_logprob_targets: jax.Array


@dataclasses.dataclass(frozen=True)
class StepVariant:
    """The static part of a step: which compiled program runs."""

    sampler: SamplerFlags
    num_prompt_logprobs: int | None  # None: no prompt logprobs computed


@dataclasses.dataclass
class StepResult:
    """Host copies of one step's outputs (rows follow the scheduled order)."""

    sampled: SamplerOutput
    prompt_logprobs: tuple[np.ndarray, np.ndarray, np.ndarray] | None


class ModelRunner:
    """Owns the weights, the KV cache and the compiled step programs."""

    def __init__(self, model_config: ModelConfig, graphdef: nnx.GraphDef, state: nnx.State,
                 num_pages: int, page_size: int, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int, dtype: Any, attention_backend: str):
        self.model_config = model_config
        self.graphdef = graphdef
        self.state = state
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.attention_backend = attention_backend
        self.token_buckets = _powers_of_two(min(16, max_num_batched_tokens), max_num_batched_tokens)
        self.seq_buckets = _powers_of_two(min(8, max_num_seqs), max_num_seqs)
        self.kv_caches = [
            ops.allocate_kv_pages(num_pages, page_size, model_config.num_kv_heads,
                                  model_config.head_dim, dtype)
            for _ in range(model_config.num_layers)]
        self._programs_seen: set[tuple[int, int, StepVariant]] = set()
        self._step = jax.jit(self._step_impl, static_argnames=("variant",), donate_argnames=("kv_caches",))

    # ---------------------------------------------------------------- device side
    def _step_impl(self, state: nnx.State, kv_caches: list[jax.Array], batch: StepInput,
                   variant: StepVariant):
        model: LlamaForCausalLM = nnx.merge(self.graphdef, state)
        hidden, kv_caches = model(batch.token_ids, batch.positions, kv_caches, batch.attention,
                                  self.attention_backend)
        logits = model.compute_logits(hidden[batch.logits_indices])
        sampled = sample(logits, batch.sampling, variant.sampler)
        prompt = None
        if variant.num_prompt_logprobs is not None:
            prompt = compute_logprobs(model.compute_logits(hidden), batch.prompt_logprob_targets,
                                      variant.num_prompt_logprobs)
        return sampled, prompt, kv_caches

    # ---------------------------------------------------------------- host side
    def buckets(self) -> list[tuple[int, int]]:
        """Every (token bucket, sequence bucket) pair a step can be padded to."""
        return [(t, n) for t in self.token_buckets for n in self.seq_buckets
                if n <= t or n == self.seq_buckets[0]]

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[StepInput, StepVariant]:
        """Flattens the scheduled chunks into one padded ragged batch (host numpy arrays)."""
        num_tokens = sum(s.num_new_tokens for s in scheduled)
        num_seqs = len(scheduled)
        padded_tokens = _bucket(num_tokens, self.token_buckets)
        padded_seqs = _bucket(num_seqs, self.seq_buckets)

        token_ids = np.zeros(padded_tokens, np.int32)
        positions = np.zeros(padded_tokens, np.int32)
        slot_mapping = np.full(padded_tokens, -1, np.int32)
        prompt_targets = np.full(padded_tokens, -1, np.int32)
        query_start_loc = np.full(padded_seqs + 1, num_tokens, np.int32)
        seq_lens = np.zeros(padded_seqs, np.int32)
        block_tables = np.zeros((padded_seqs, self.max_pages_per_seq), np.int32)
        logits_indices = np.zeros(padded_seqs, np.int32)

        sampling_rows = []
        cursor = 0
        for i, item in enumerate(scheduled):
            seq, count = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            stop = start + count
            token_ids[cursor:cursor + count] = seq.token_ids[start:stop]
            positions[cursor:cursor + count] = np.arange(start, stop)
            table = np.asarray(seq.block_table, np.int32)
            pos = np.arange(start, stop)
            slot_mapping[cursor:cursor + count] = table[pos // self.page_size] * self.page_size + \
                pos % self.page_size
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                last = min(stop, seq.num_prompt_tokens - 1)
                prompt_targets[cursor:cursor + last - start] = seq.token_ids[start + 1:last + 1]
            query_start_loc[i] = cursor
            seq_lens[i] = stop
            block_tables[i, :len(table)] = table
            logits_indices[i] = cursor + count - 1
            sampling_rows.append(seq)
            cursor += count
        query_start_loc[0] = 0

        sampling, sampler_flags = self._sampling_metadata(sampling_rows, padded_seqs)
        wants_prompt = [s.seq.params.prompt_logprobs for s in scheduled
                        if s.seq.params.prompt_logprobs is not None
                        and s.seq.num_computed_tokens < s.seq.num_prompt_tokens - 1]
        variant = StepVariant(sampler_flags, max(wants_prompt) if wants_prompt else None)
        batch = StepInput(
            token_ids=token_ids, positions=positions,
            attention=AttentionMetadata(slot_mapping=slot_mapping, query_start_loc=query_start_loc,
                                        seq_lens=seq_lens, block_tables=block_tables),
            logits_indices=logits_indices, sampling=sampling, prompt_logprob_targets=prompt_targets)
        return batch, variant

    def _sampling_metadata(self, seqs: list, rows: int) -> tuple[SamplingMetadata, SamplerFlags]:
        def column(values: list, dtype: Any, fill: Any) -> np.ndarray:
            out = np.full(rows, fill, dtype)
            out[:len(values)] = values
            return out

        params = [seq.params for seq in seqs]
        banned = [list(seq.request.eos_token_ids) + seq.params.stop_token_ids
                  if seq.num_output_tokens < seq.params.min_tokens else [] for seq in seqs]
        use_penalties = any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
                            for p in params)
        use_banned = any(banned)
        flags = SamplerFlags(
            all_greedy=all(p.is_greedy for p in params),
            use_top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in params if not p.is_greedy),
            use_min_p=any(p.min_p > 0 for p in params if not p.is_greedy),
            use_penalties=use_penalties,
            use_banned_tokens=use_banned,
            num_logprobs=max((p.logprobs or 0 for p in params), default=0),
        )
        empty = np.zeros((rows, 0), np.int32)
        if use_penalties:
            prompts = [seq.token_ids[:seq.num_prompt_tokens] for seq in seqs]
            outputs = [seq.output_token_ids for seq in seqs]
            prompt_ids = _padded(prompts, rows, _next_power_of_two(max(map(len, prompts))))
            output_ids = _padded(outputs, rows, _next_power_of_two(max(map(len, outputs))))
        else:
            prompt_ids = output_ids = empty
        banned_ids = _padded(banned, rows, _next_power_of_two(max(map(len, banned)))) if use_banned \
            else empty
        metadata = SamplingMetadata(
            temperature=column([p.temperature for p in params], np.float32, 0.0),
            top_k=column([p.top_k for p in params], np.int32, 0),
            top_p=column([p.top_p for p in params], np.float32, 1.0),
            min_p=column([p.min_p for p in params], np.float32, 0.0),
            presence_penalty=column([p.presence_penalty for p in params], np.float32, 0.0),
            frequency_penalty=column([p.frequency_penalty for p in params], np.float32, 0.0),
            repetition_penalty=column([p.repetition_penalty for p in params], np.float32, 1.0),
            seeds=column([seq.seed for seq in seqs], np.uint32, 0),
            sample_index=column([seq.sample_index for seq in seqs], np.int32, 0),
            step=column([seq.num_output_tokens for seq in seqs], np.int32, 0),
            prompt_token_ids=prompt_ids, output_token_ids=output_ids, banned_token_ids=banned_ids)
        return metadata, flags

    def execute(self, batch: StepInput, variant: StepVariant) -> StepResult:
        """Runs one step; blocks only on the small output arrays."""
        program = (batch.token_ids.shape[0], batch.logits_indices.shape[0], variant)
        first_call = program not in self._programs_seen
        start = time.perf_counter()
        sampled, prompt, self.kv_caches = self._step(self.state, self.kv_caches, batch, variant=variant)
        sampled, prompt = jax.device_get((sampled, prompt))
        if first_call:
            self._programs_seen.add(program)
            logger.info("first step with T=%d N=%d %s took %.1f s (compile + run)", program[0],
                        program[1], variant, time.perf_counter() - start)
        return StepResult(sampled, prompt)

    def warmup(self) -> None:
        """Compiles the default step program for every bucket, so serving never compiles."""
        start = time.perf_counter()
        variant = StepVariant(SamplerFlags(all_greedy=False, use_top_k_top_p=False, use_min_p=False,
                                           use_penalties=False, use_banned_tokens=False,
                                           num_logprobs=0), None)
        for tokens, seqs in self.buckets():
            batch = self.dummy_batch(tokens, seqs)
            self._step.lower(self.state, self.kv_caches, batch, variant=variant).compile()
        logger.info("compiled %d buckets in %.1f s", len(self.buckets()), time.perf_counter() - start)

    def dummy_batch(self, tokens: int, seqs: int) -> StepInput:
        """An all-padding batch of the given bucket: writes no KV, samples nothing real."""
        zeros_t = np.zeros(tokens, np.int32)
        rows = np.zeros(seqs, np.float32)
        empty = np.zeros((seqs, 0), np.int32)
        sampling = SamplingMetadata(
            temperature=rows, top_k=rows.astype(np.int32), top_p=rows + 1, min_p=rows,
            presence_penalty=rows, frequency_penalty=rows, repetition_penalty=rows + 1,
            seeds=rows.astype(np.uint32), sample_index=rows.astype(np.int32), step=rows.astype(np.int32),
            prompt_token_ids=empty, output_token_ids=empty, banned_token_ids=empty)
        return StepInput(
            token_ids=zeros_t, positions=zeros_t,
            attention=AttentionMetadata(slot_mapping=zeros_t - 1,
                                        query_start_loc=np.zeros(seqs + 1, np.int32),
                                        seq_lens=np.zeros(seqs, np.int32),
                                        block_tables=np.zeros((seqs, self.max_pages_per_seq), np.int32)),
            logits_indices=np.zeros(seqs, np.int32), sampling=sampling,
            prompt_logprob_targets=zeros_t - 1)


def _next_power_of_two(value: int) -> int:
    return 1 if value <= 1 else 1 << (value - 1).bit_length()
