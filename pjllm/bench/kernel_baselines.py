"""The implementations `pjllm bench kernels` times pjllm's Pallas kernel against (its module
docstring lists them), each built from a case's inputs outside the timed loop: the pure-jnp
reference, jax's bundled Pallas paged attention, and two on the dense equivalent of a one-sequence
prefill (cuDNN, and jax's bundled Mosaic GPU flash attention).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from pjllm.bench.kernels import Case, Inputs


def reference_fn(case: Case, inputs: Inputs, interpret: bool) -> Callable:
    from pjllm.kernels import reference

    md, scale, window = inputs.metadata, inputs.sm_scale, inputs.sliding_window
    return lambda q, kv: reference.paged_attention_reference(q, kv, md, sm_scale=scale,
                                                             sliding_window=window)


def bundled_fn(case: Case, inputs: Inputs, interpret: bool) -> tuple[Callable, list, list]:
    """jax's bundled Pallas paged attention: q pre-scaled (it applies no softmax scale), separate
    K / V page arrays, block tables padded to a power of 2 of pages (its k_splits must divide
    them), decode batches only. Returns (fn, q per call, KV sets), all prepared outside timing."""
    import jax.numpy as jnp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import paged_attention as bundled

    if case.kind != "decode" or case.num_tokens != case.num_seqs or case.sliding_window:
        raise NotImplementedError("decode without a sliding window only")
    md = inputs.metadata
    width = 1 << max(0, (case.max_pages - 1).bit_length())
    tables = jnp.pad(md.block_tables, ((0, 0), (0, width - md.block_tables.shape[1])))
    lengths = md.seq_lens.astype(jnp.int32)
    k_splits = min(16, width)
    kv_sets = [(kv[0], kv[1]) for kv in inputs.kvs]          # materialized once, outside timing
    qs = [(q.astype(jnp.float32) * inputs.sm_scale).astype(q.dtype) for q in inputs.qs]

    def fn(q, kv):
        k_pages, v_pages = kv
        return bundled.paged_attention(q, k_pages, v_pages, tables, lengths, k_splits=k_splits,
                                       interpret=interpret)
    return fn, qs, kv_sets


def dense_inputs(case: Case, inputs: Inputs) -> tuple[list, list]:
    """The one real sequence of a prefill case as dense arrays: q per call [1, T, Hq, D] and
    (k, v) sets, each [1, S, Hkv, D] (S = the context, offset + T)."""
    import jax
    import jax.numpy as jnp

    if case.kind != "prefill" or len(case.q_lens) != 1 or case.sliding_window:
        raise NotImplementedError("prefill of one sequence without a sliding window only")
    q_len, ctx = case.q_lens[0], case.ctx_lens[0]
    pages = inputs.metadata.block_tables[0, : -(-ctx // case.page_size)]

    def dense_kv(kv):                                         # [2, Hkv, P, ps, D] -> 2 x [1, S, Hkv, D]
        ctx_kv = kv[:, :, pages].reshape(2, case.num_kv_heads, -1, case.head_dim)[:, :, :ctx]
        ctx_kv = jnp.transpose(ctx_kv, (0, 2, 1, 3))[:, None]
        return ctx_kv[0], ctx_kv[1]

    return [q[None, :q_len] for q in inputs.qs], [jax.jit(dense_kv)(kv) for kv in inputs.kvs]


def cudnn_fn(case: Case, inputs: Inputs, on_gpu: bool) -> tuple[Callable, list, list, str]:
    """jax.nn.dot_product_attention on the dense [1, S, H, D] equivalent of the one real sequence.

    Returns (fn(q_dense, (k, v)), dense q per call, dense (k, v) sets, implementation)."""
    import jax
    import jax.numpy as jnp

    qs, kv_sets = dense_inputs(case, inputs)
    q_len, ctx = case.q_lens[0], case.ctx_lens[0]
    implementation = "cudnn" if on_gpu else "xla"
    offset = ctx - q_len
    scale = inputs.sm_scale
    if offset == 0:
        bias = None
    else:                                                     # bottom-right causal mask
        allowed = (jnp.arange(ctx)[None, :] <= offset + jnp.arange(q_len)[:, None])
        bias = jnp.where(allowed, 0.0, -1e9).astype(qs[0].dtype)[None, None]

    def fn(q, kv):
        k, v = kv
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale,
                                            is_causal=offset == 0, implementation=implementation)
    return fn, qs, kv_sets, implementation + (" (bias mask)" if bias is not None else "")


def mosaic_dense_fn(case: Case, inputs: Inputs, on_gpu: bool) -> tuple[Callable, list, list, str]:
    """jax's bundled Hopper flash attention in Mosaic GPU (jax.experimental.pallas.ops.gpu.
    attention_mgpu: wgmma, TMA, two compute warpgroups) on the dense causal equivalent, in
    float16 (the kernel's only dtype; same tensor-core rate as bfloat16): what a Mosaic GPU
    kernel reaches on this GPU before paging. Prefill at offset 0 on a GPU only.

    Returns (fn(q_dense, (k, v)), dense q per call (pre-scaled: the kernel does not scale), dense
    (k, v) sets, implementation with its KV block)."""
    if not on_gpu or case.ctx_lens[0] != case.q_lens[0] or case.q_lens[0] % 64:
        raise NotImplementedError("a GPU and a prefill at offset 0 of a multiple of 64 tokens only")
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    qs, kv_sets = dense_inputs(case, inputs)
    # in float16: the kernel's shared-memory buffers are float16 whatever the inputs' dtype
    qs = [(q.astype(jnp.float32) * inputs.sm_scale).astype(jnp.float16) for q in qs]
    kv_sets = [(k.astype(jnp.float16), v.astype(jnp.float16)) for k, v in kv_sets]
    for block_kv in (256, 128, 64):  # the largest KV block that fits in shared memory
        config = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2,
                                             causal=True)
        try:
            attention_mgpu.attention(qs[0], *kv_sets[0], config=config).block_until_ready()
        except ValueError as exc:
            if "shared memory" not in str(exc):
                raise
            continue

        def fn(q, kv, config=config):
            return attention_mgpu.attention(q, *kv, config=config)
        return fn, qs, kv_sets, f"mosaic_gpu block_kv={block_kv}"
    raise ValueError("no KV block fits in shared memory")


# Implementations on the dense [1, S, H, D] equivalent: their output is [1, T, Hq, D], of the real
# tokens only. Each returns (fn, q per call, KV sets, implementation name).
DENSE_BASELINES = {"cudnn": cudnn_fn, "mosaic_dense": mosaic_dense_fn}
