"""The model runner: pads a scheduled batch into a bucket and runs the jitted step on device.

One jitted `step` does everything numeric (embedding, layers, paged attention, sampling); only
sampled token ids and requested logprobs come back to the host. Shapes are fixed per bucket
(token count T, sequence count N); real counts are array data, so a new batch never recompiles.
The KV pages are donated: the cache is updated in place. `dispatch` returns before the device
finishes, and a step may read the previous step's sampled tokens on device, so the host can
prepare step N+1 while step N runs.
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
from pjllm.engine.scheduler import ScheduledSeq
from pjllm.kernels import ops
from pjllm.kernels.attention_metadata import AttentionMetadata
from pjllm.models.llama import LlamaForCausalLM
from pjllm.runner.programs import ProgramCache
from pjllm.runner.sampler import (SORT_FREE_TOP_K, SamplerFlags, SamplerOutput, SamplingMetadata,
                                  TokenLogprobs, compute_logprobs, sample)


# The smallest token bucket, by JAX platform. On a GPU a step of up to 256 tokens is bound by
# reading the weights, so a 1-token decode padded to 16 costs what 1 token costs; a CPU's
# matmuls are compute-bound from the first token, and the same padding made a batch-1 decode
# step do 16 tokens of work (docs/perf.md, CPU).
SMALLEST_TOKEN_BUCKET = {"cpu": 1}
DEFAULT_SMALLEST_TOKEN_BUCKET = 16


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
    last_token_rows:        i32[T] row of the previous step's sampled tokens that replaces the
                            token id (its value was not on the host yet); -1: use token_ids
    attention:              the ragged batch layout (AttentionMetadata)
    logits_indices:         i32[N] index into T of each sequence's last query token
    sampling:               SamplingMetadata, per sequence
    prompt_logprob_targets: i32[T] next prompt token of each token (only read when prompt
                            logprobs are requested; -1 where there is none)
    """

    token_ids: jax.Array
    last_token_rows: jax.Array
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


# cuBLAS, not Triton, for the step's GEMMs: on the H100 cuBLAS won anyway (chat throughput
# +2% without Triton GEMMs) and leaving Triton's candidates out of autotuning cuts the compile
# of the 8B step programs by 40% (docs/perf.md).
STEP_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}

# The program every bucket is compiled for at startup; other variants compile when first used.
DEFAULT_VARIANT = StepVariant(SamplerFlags(), None)


@dataclasses.dataclass
class StepHandle:
    """Device outputs of a dispatched step, not yet waited for."""

    sampled: SamplerOutput
    prompt_logprobs: TokenLogprobs | None


@dataclasses.dataclass
class StepResult:
    """Host copies of one step's outputs (rows follow the scheduled order)."""

    sampled: SamplerOutput
    prompt_logprobs: TokenLogprobs | None


def matmul_precision(dtype: Any) -> str:
    """The matmul precision of a model in `dtype`: float32 means float32 in every dot (XLA would
    use TF32 on NVIDIA GPUs by default); bf16 and fp16 keep the backend's default."""
    return "highest" if jnp.dtype(dtype) == jnp.float32 else "default"


def run_step(weights: list[jax.Array], kv_caches: list[jax.Array], last_tokens: jax.Array,
             batch: StepInput, *, graphdef: nnx.GraphDef, state_treedef: Any, attention_backend: str,
             precision: str, variant: StepVariant):
    """One engine step as a pure function: forward over the ragged batch, then sampling.

    `weights` is the model state's arrays as a flat list (`jax.tree.flatten(state)`, whose
    treedef is `state_treedef`): passing the nnx.State itself calls back into Python for each of
    its variables on every dispatch (1.6 -> 1.0 ms a step on CPU for the default model).
    Returns (SamplerOutput, prompt TokenLogprobs or None, updated kv_caches, last_tokens i32[S]).
    """
    with jax.default_matmul_precision(precision):
        model: LlamaForCausalLM = nnx.merge(graphdef, jax.tree.unflatten(state_treedef, weights))
        token_ids = jnp.where(batch.last_token_rows >= 0,
                              last_tokens[jnp.maximum(batch.last_token_rows, 0)], batch.token_ids)
        hidden, kv_caches = model(token_ids, batch.positions, kv_caches, batch.attention,
                                  attention_backend)
        logits = model.compute_logits(hidden[batch.logits_indices])
        sampled = sample(logits, batch.sampling, variant.sampler)
        prompt = None
        if variant.num_prompt_logprobs is not None:
            prompt = compute_logprobs(model.compute_logits(hidden), batch.prompt_logprob_targets,
                                      variant.num_prompt_logprobs)
    last_tokens = jnp.zeros_like(last_tokens).at[:sampled.token_ids.shape[0]].set(sampled.token_ids)
    return sampled, prompt, kv_caches, last_tokens


def _abstract(tree: Any) -> Any:
    """The shapes, dtypes and shardings of a pytree of arrays, holding no device memory."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


class ModelRunner:
    """Owns the weights, the KV cache and the compiled step programs.

    Nothing but the runner's own fields refers to its device arrays (the jitted step is a pure
    function, and programs are lowered from abstract shapes), so dropping the runner frees its
    memory, and `shutdown` frees it at once.
    """

    def __init__(self, model_config: ModelConfig, graphdef: nnx.GraphDef, state: nnx.State,
                 num_pages: int, page_size: int, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int, dtype: Any, attention_backend: str):
        self.model_config = model_config
        self.weights, state_treedef = jax.tree.flatten(state)
        self.dtype = dtype
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.max_num_seqs = max_num_seqs
        self.token_buckets = token_bucket_sizes(
            max_num_batched_tokens,
            SMALLEST_TOKEN_BUCKET.get(jax.default_backend(), DEFAULT_SMALLEST_TOKEN_BUCKET))
        self.reset_device_state()
        step = jax.jit(functools.partial(run_step, graphdef=graphdef, state_treedef=state_treedef,
                                         attention_backend=attention_backend,
                                         precision=matmul_precision(dtype)),
                       static_argnames=("variant",), donate_argnames=("kv_caches",),
                       compiler_options=STEP_COMPILER_OPTIONS)
        device_args = _abstract((self.weights, self.kv_caches, self.last_tokens))

        def lower(key: tuple) -> jax.stages.Lowered:
            variant, treedef, specs = key
            batch = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(shape, dtype)
                                                 for shape, dtype in specs])
            return step.lower(*device_args, batch, variant=variant)

        self.programs = ProgramCache(lower, describe=_describe_program)
        # Dropped without shutdown (its last reference gone), the runner stops its warmup too.
        weakref.finalize(self, self.programs.close, wait=False)

    def reset_device_state(self) -> None:
        """Fresh (zeroed) KV pages and sampled-token buffer, e.g. after a step failed on device
        and left the donated ones unusable."""
        cfg = self.model_config
        self.kv_caches = [ops.allocate_kv_pages(self.num_pages, self.page_size, cfg.num_kv_heads,
                                                cfg.head_dim, self.dtype)
                          for _ in range(cfg.num_layers)]
        # The last sampled token of every row, kept on device so the next step can read tokens
        # the host has not seen yet (async scheduling). Fixed size, so it adds no compiled shapes.
        self.last_tokens = jnp.zeros(self.max_num_seqs, jnp.int32)

    def device_state_lost(self) -> bool:
        """Whether the KV cache is gone: donated to a step launch that then failed."""
        return any(pages.is_deleted() for pages in self.kv_caches)

    def shutdown(self) -> None:
        """Stops the warmup, drops the compiled programs and frees the weights and KV cache."""
        self.programs.close()
        for array in jax.tree.leaves((self.weights, self.kv_caches, self.last_tokens)):
            array.delete()
        self.weights = self.kv_caches = self.last_tokens = None

    # ---------------------------------------------------------------- host side
    def buckets(self) -> list[tuple[int, int]]:
        """Every (token bucket T, sequence bucket N) a step can be padded to.

        N is tied to T (a batch of T tokens holds at most T sequences), so there is one program
        per token bucket: a few seconds of compile each for an 8B model, not tens of programs.
        """
        return [(tokens, self.seq_bucket(tokens)) for tokens in self.token_buckets]

    def seq_bucket(self, padded_tokens: int) -> int:
        """The sequence bucket N of token bucket T: at most one sequence per token."""
        return min(padded_tokens, self.max_num_seqs)

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[StepInput, StepVariant]:
        """Flattens the scheduled chunks into one padded ragged batch (host numpy arrays)."""
        num_tokens = sum(s.num_new_tokens for s in scheduled)
        padded_tokens = _bucket(num_tokens, self.token_buckets)
        padded_seqs = self.seq_bucket(padded_tokens)

        token_ids = np.zeros(padded_tokens, np.int32)
        last_token_rows = np.full(padded_tokens, -1, np.int32)
        positions = np.zeros(padded_tokens, np.int32)
        slot_mapping = np.full(padded_tokens, -1, np.int32)
        prompt_targets = np.full(padded_tokens, -1, np.int32)
        query_start_loc = np.full(padded_seqs + 1, num_tokens, np.int32)
        seq_lens = np.zeros(padded_seqs, np.int32)
        block_tables = np.zeros((padded_seqs, self.max_pages_per_seq), np.int32)
        logits_indices = np.zeros(padded_seqs, np.int32)

        page_size = self.page_size
        cursor = 0
        for i, item in enumerate(scheduled):
            seq, count = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            stop = start + count
            table = seq.block_table
            if count == 1:  # a decode: plain Python scalars beat small numpy ops here
                token_ids[cursor] = seq.token_ids[start]
                positions[cursor] = start
                slot_mapping[cursor] = table[start // page_size] * page_size + start % page_size
            else:
                token_ids[cursor:cursor + count] = seq.token_ids[start:stop]
                pos = np.arange(start, stop)
                positions[cursor:cursor + count] = pos
                slot_mapping[cursor:cursor + count] = (np.asarray(table, np.int32)[pos // page_size]
                                                       * page_size + pos % page_size)
            if seq.num_pending and stop == seq.num_tokens:
                # The last token was sampled by the step still in flight: read it on device.
                token_ids[cursor + count - 1] = 0
                last_token_rows[cursor + count - 1] = seq.pending_row
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                last = min(stop, seq.num_prompt_tokens - 1)
                prompt_targets[cursor:cursor + last - start] = seq.token_ids[start + 1:last + 1]
            query_start_loc[i] = cursor
            seq_lens[i] = stop
            block_tables[i, :len(table)] = table
            cursor += count
            logits_indices[i] = cursor - 1
        query_start_loc[0] = 0

        sampling, sampler_flags = self._sampling_metadata([item.seq for item in scheduled], padded_seqs)
        wants_prompt = [s.seq.params.prompt_logprobs for s in scheduled
                        if s.seq.params.prompt_logprobs is not None
                        and s.seq.num_computed_tokens < s.seq.num_prompt_tokens - 1]
        variant = StepVariant(sampler_flags, max(wants_prompt) if wants_prompt else None)
        batch = StepInput(
            token_ids=token_ids, last_token_rows=last_token_rows, positions=positions,
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
        # top_k at or above the vocabulary keeps every token: off, as vLLM treats it.
        top_k = [p.top_k if p.top_k < self.model_config.vocab_size else 0 for p in params]
        banned = [list(seq.request.eos_token_ids) + seq.params.stop_token_ids
                  if seq.num_output_tokens < seq.params.min_tokens else [] for seq in seqs]
        use_penalties = any(p.uses_penalties for p in params)
        use_banned = any(banned)
        filtered = [(p, k) for p, k in zip(params, top_k) if not p.is_greedy and (k > 0 or p.top_p < 1.0)]
        flags = SamplerFlags(
            use_top_k_top_p=bool(filtered),
            sort_free_top_k=bool(filtered) and all(0 < k <= SORT_FREE_TOP_K for _, k in filtered),
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
            top_k=column(top_k, np.int32, 0),
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

    def dispatch(self, batch: StepInput, variant: StepVariant) -> "StepHandle":
        """Launches one step on device and returns at once (JAX dispatch is asynchronous), once
        the step's program is compiled."""
        program = self.programs.get(self.program_key(batch, variant))
        sampled, prompt, self.kv_caches, self.last_tokens = program(
            self.weights, self.kv_caches, self.last_tokens, batch)
        return StepHandle(sampled, prompt)

    @staticmethod
    def fetch(handle: "StepHandle") -> StepResult:
        """Waits for a dispatched step and copies its (small) outputs to the host."""
        sampled, prompt = jax.device_get((handle.sampled, handle.prompt_logprobs))
        return StepResult(sampled, prompt)

    def start_warmup(self) -> None:
        """Starts compiling the default step program (plain sampling, which also serves greedy
        rows) of every token bucket in the background, smallest first; returns at once."""
        self.programs.warm(self.program_key(self.dummy_batch(*bucket), DEFAULT_VARIANT)
                           for bucket in self.buckets())

    def wait_for_warmup(self) -> dict[str, float]:
        """Blocks until the warmup's programs are compiled; returns its {"lower_s", "compile_s"}."""
        return self.programs.wait_for_warmup()

    @staticmethod
    def program_key(batch: StepInput, variant: StepVariant) -> tuple:
        """What selects a compiled program: the variant and every input's shape and dtype (the
        buckets, and the padded widths of penalty and banned-token lists)."""
        leaves, treedef = jax.tree.flatten(batch)
        return variant, treedef, tuple((leaf.shape, leaf.dtype) for leaf in leaves)

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
            token_ids=zeros_t, last_token_rows=zeros_t - 1, positions=zeros_t,
            attention=AttentionMetadata(slot_mapping=zeros_t - 1,
                                        query_start_loc=np.zeros(seqs + 1, np.int32),
                                        seq_lens=np.zeros(seqs, np.int32),
                                        block_tables=np.zeros((seqs, self.max_pages_per_seq), np.int32)),
            logits_indices=np.zeros(seqs, np.int32), sampling=sampling,
            prompt_logprob_targets=zeros_t - 1)


def _describe_program(key: tuple) -> str:
    variant, _, specs = key
    return f"T={specs[0][0][0]} {variant}"  # specs[0]: token_ids, the first leaf of StepInput


def _next_power_of_two(value: int) -> int:
    return 1 if value <= 1 else 1 << (value - 1).bit_length()
