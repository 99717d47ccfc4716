"""The step's programs as pure functions over arrays, and their inputs.

The forward (`run_forward`, one program per token bucket), the sampler (`run_sampler`, one per
sequence bucket and `SamplerFlags`) and the prompt logprobs (`run_prompt_logprobs`) are what
the model runner jits, lowers and dispatches; they hold no state, so the runner's device arrays
are only ever its own fields. `StepInput` is what the host lays out for one step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pjllm.kernels.attention_metadata import AttentionMetadata
from pjllm.kernels.ops import AttentionBackend
from pjllm.models.interface import CausalLM
from pjllm.runner.input_batch import MAX_BANNED_TOKENS
from pjllm.runner.packing import PackedLayout, unpack
from pjllm.runner.sampler import (SamplerFlags, SamplingMetadata, TokenLogprobs, compute_logprobs,
                                  few_searched_rows, sample)
from pjllm.sharding import replicated, vocab_sharded


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInput:
    """One step's device inputs (T = token bucket, N = sequence bucket).

    token_ids, positions:   i32[T]
    last_token_rows:        i32[T] row of the previous step's sampled tokens that replaces the
                            token id (its value was not on the host yet); -1: use token_ids
    seq_rows:               i32[N] each sequence's row of the block table kept on device (R+1
                            rows of W pages, `with_block_tables`; padding sequences: row R)
    attention:              the ragged batch layout (AttentionMetadata), without block tables
                            (None): the programs read them from the device's table
    logits_indices:         i32[N] index into T of each sequence's last query token
    sampling:               SamplingMetadata, per sequence (read by the sampler program)
    prompt_logprob_targets: i32[T] next prompt token of each token (read by the prompt
                            logprobs program; -1 where there is none)
    """

    token_ids: jax.Array
    last_token_rows: jax.Array
    positions: jax.Array
    seq_rows: jax.Array
    attention: AttentionMetadata
    logits_indices: jax.Array
    sampling: SamplingMetadata
    prompt_logprob_targets: jax.Array


@dataclasses.dataclass(frozen=True)
class StepVariant:
    """What the host chose for a step beyond its buckets: the sampler program, and whether the
    prompt logprobs program runs. Both come from a fixed set that the warmup builds."""

    sampler: SamplerFlags
    prompt_logprobs: bool


# cuBLAS, not Triton, for the step's GEMMs: on the H100 cuBLAS won anyway (chat throughput
# +2% without Triton GEMMs) and leaving Triton's candidates out of autotuning cuts the compile
# of the 8B step programs by 40% (docs/perf.md).
STEP_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
# Except in the forwards of at most this many tokens (GEMV-like, bound by reading the weights),
# where XLA's Triton GEMMs read them faster: H200 batch-1 TPOT 4.63 -> 4.39 ms (docs/perf.md).
# Few programs are that small, so the compile time hardly grows.
TRITON_GEMM_MAX_TOKENS = 16


def forward_compiler_options(num_tokens: int) -> dict[str, bool]:
    """XLA options of the forward program of a `num_tokens` bucket."""
    return {**STEP_COMPILER_OPTIONS, "xla_gpu_enable_triton_gemm": num_tokens <= TRITON_GEMM_MAX_TOKENS}


def matmul_precision(dtype: Any) -> str:
    """The matmul precision of a model in `dtype`: float32 means float32 in every dot (XLA would
    use TF32 on NVIDIA GPUs by default); bf16 and fp16 keep the backend's default."""
    return "highest" if jnp.dtype(dtype) == jnp.float32 else "default"


def write_block_table(block_table: jax.Array, indices: jax.Array, page_ids: jax.Array) -> jax.Array:
    """The device's block table (i32[R+1, W]) with entries `indices` (flat, i32[U]; past the end:
    padding, dropped) set to `page_ids` (i32[U])."""
    flat = block_table.reshape(-1).at[indices].set(page_ids, mode="drop")
    return flat.reshape(block_table.shape)


def with_block_tables(batch: StepInput, block_table: jax.Array) -> AttentionMetadata:
    """The step's attention metadata with its sequences' rows of the device's block table."""
    return dataclasses.replace(batch.attention, block_tables=block_table[batch.seq_rows])


def run_forward(weights: list[jax.Array], kv_caches: list[jax.Array], page_tokens: jax.Array,
                last_tokens: jax.Array, block_table: jax.Array, batch: StepInput, *,
                graphdef: nnx.GraphDef, state_treedef: Any, attention: AttentionBackend,
                precision: str):
    """The forward over the ragged batch, as a pure function.

    `weights` is the model state's arrays as a flat list (`jax.tree.flatten(state)`, whose
    treedef is `state_treedef`): passing the nnx.State itself calls back into Python for each of
    its variables on every dispatch (1.6 -> 1.0 ms a step on CPU for the default model).
    `page_tokens` i32[num_pages * page_size] holds the token id of every KV slot; each token is
    written beside its KV, so the sampler finds a sequence's history through its block table.
    `block_table` i32[R+1, W] is every row's pages (`batch.seq_rows` picks the step's).
    Returns (logits f32[N, V] of each sequence's last query token, hidden [T, D], updated
    kv_caches, updated page_tokens).
    """
    with jax.default_matmul_precision(precision):
        model: CausalLM = nnx.merge(graphdef, jax.tree.unflatten(state_treedef, weights))
        token_ids = jnp.where(batch.last_token_rows >= 0,
                              last_tokens[jnp.maximum(batch.last_token_rows, 0)], batch.token_ids)
        hidden, kv_caches = model(token_ids, batch.positions, kv_caches,
                                  with_block_tables(batch, block_table), attention)
        logits = model.compute_logits(hidden[batch.logits_indices])
        if attention.mesh is not None:
            # Whole on every device: sampling reads whole rows (gathered from the vocabulary
            # shards), and the prompt logprobs program takes the hidden states as they are.
            whole = replicated(attention.mesh)
            # Each device computes its vocabulary shard's logits, then they are gathered (rather
            # than the output layer's weights, a far larger gather).
            logits = jax.lax.with_sharding_constraint(logits, vocab_sharded(attention.mesh))
            logits = jax.lax.with_sharding_constraint(logits, whole)
            hidden = jax.lax.with_sharding_constraint(hidden, whole)
    slots = batch.attention.slot_mapping
    page_tokens = page_tokens.at[jnp.where(slots >= 0, slots, page_tokens.shape[0])].set(
        token_ids, mode="drop")
    return logits, hidden, kv_caches, page_tokens


def token_history(page_tokens: jax.Array, block_tables: jax.Array, seq_lens: jax.Array,
                  page_size: int) -> jax.Array:
    """i32[N, W * page_size]: each sequence's token ids by position, -1 from its length on.

    Gathered on device from the tokens the forward wrote beside their KV, so penalties need no
    host-side token lists (and no input whose width grows with the sequences)."""
    width = block_tables.shape[1] * page_size
    position = jnp.arange(width, dtype=jnp.int32)
    slots = block_tables[:, position // page_size] * page_size + position % page_size
    return jnp.where(position[None, :] < seq_lens[:, None], page_tokens[slots], -1)


def run_sampler(logits: jax.Array, last_tokens: jax.Array, page_tokens: jax.Array,
                block_table: jax.Array, sampling: SamplingMetadata, seq_rows: jax.Array,
                seq_lens: jax.Array, *, page_size: int, flags: SamplerFlags):
    """Samples each row's next token; returns (SamplerOutput, last_tokens i32[S] with the new
    tokens in the first N rows, for the next step to read on device). Its inputs are the
    step's per-sequence ones only (N rows), so a sampler program serves every token bucket."""
    history = (token_history(page_tokens, block_table[seq_rows], seq_lens, page_size)
               if flags.use_penalties else None)
    sampled = sample(logits, sampling, flags, history)
    last_tokens = jnp.zeros_like(last_tokens).at[:sampled.token_ids.shape[0]].set(sampled.token_ids)
    return sampled, last_tokens


def forward_from_buffers(weights: list[jax.Array], kv_caches: list[jax.Array],
                         page_tokens: jax.Array, last_tokens: jax.Array, block_table: jax.Array,
                         token_buffer: jax.Array, sequence_buffer: jax.Array, *,
                         layout: PackedLayout, **statics):
    """`run_forward` of the StepInput packed into the two buffers (`runner/packing.py`)."""
    return run_forward(weights, kv_caches, page_tokens, last_tokens, block_table,
                       unpack(layout, token_buffer, sequence_buffer), **statics)


def sampler_from_buffer(logits: jax.Array, last_tokens: jax.Array, page_tokens: jax.Array,
                        block_table: jax.Array, sequence_buffer: jax.Array, *,
                        layout: PackedLayout, page_size: int, flags: SamplerFlags):
    """`run_sampler` of the per-sequence inputs packed into `sequence_buffer`."""
    batch = unpack(layout, None, sequence_buffer)
    return run_sampler(logits, last_tokens, page_tokens, block_table, batch.sampling,
                       batch.seq_rows, batch.attention.seq_lens, page_size=page_size, flags=flags)


# Prompt logprobs are computed this many tokens at a time: the float32 logits of a whole
# 8192-token bucket are 4 GiB for a 128k vocabulary (and XLA's autotuner wants as much again),
# those of 64 tokens 32 MiB.
PROMPT_LOGPROBS_CHUNK = 64


def run_prompt_logprobs(weights: list[jax.Array], hidden: jax.Array, targets: jax.Array, *,
                        graphdef: nnx.GraphDef, state_treedef: Any, precision: str,
                        num_logprobs: int) -> TokenLogprobs:
    """Logprobs of every token's next prompt token (`targets` i32[T]) and its top num_logprobs,
    from the forward's hidden states [T, D], PROMPT_LOGPROBS_CHUNK tokens at a time."""
    tokens = hidden.shape[0]
    chunk = min(tokens, PROMPT_LOGPROBS_CHUNK)
    padded = -(-tokens // chunk) * chunk
    hidden = jnp.pad(hidden, ((0, padded - tokens), (0, 0))).reshape(padded // chunk, chunk, -1)
    targets = jnp.pad(targets, (0, padded - tokens)).reshape(padded // chunk, chunk)
    with jax.default_matmul_precision(precision):
        model: CausalLM = nnx.merge(graphdef, jax.tree.unflatten(state_treedef, weights))
        chunks = jax.lax.map(lambda args: compute_logprobs(model.compute_logits(args[0]), args[1],
                                                           num_logprobs), (hidden, targets))
    return jax.tree.map(lambda a: a.reshape(padded, *a.shape[2:])[:tokens], chunks)


def dummy_batch(tokens: int, seqs: int, cascade: bool = False) -> StepInput:
    """An all-padding batch of the given bucket: writes no KV, samples nothing real (`cascade`:
    with an empty common prefix, the cascade attention program's inputs)."""
    zeros_t = np.zeros(tokens, np.int32)
    rows = np.zeros(seqs, np.float32)
    sampling = SamplingMetadata(
        temperature=rows, top_k=rows.astype(np.int32), top_p=rows + 1, min_p=rows,
        presence_penalty=rows, frequency_penalty=rows, repetition_penalty=rows + 1,
        seeds=rows.astype(np.uint32), sample_index=rows.astype(np.int32), step=rows.astype(np.int32),
        prompt_lens=rows.astype(np.int32),
        banned_token_ids=np.full((seqs, MAX_BANNED_TOKENS), -1, np.int32),
        search_rows=np.full(few_searched_rows(seqs), seqs, np.int32))
    return StepInput(
        token_ids=zeros_t, last_token_rows=zeros_t - 1, positions=zeros_t,
        seq_rows=np.zeros(seqs, np.int32),
        attention=AttentionMetadata(slot_mapping=zeros_t - 1,
                                    query_start_loc=np.zeros(seqs + 1, np.int32),
                                    seq_lens=np.zeros(seqs, np.int32), block_tables=None,
                                    common_prefix_len=np.int32(0) if cascade else None),
        logits_indices=np.zeros(seqs, np.int32), sampling=sampling,
        prompt_logprob_targets=zeros_t - 1)

