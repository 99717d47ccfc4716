"""What models call: KV cache allocation, KV writes and paged attention, dispatched by backend.

KV page layout (per layer): kv_pages [2, num_kv_heads, num_pages, page_size, head_dim],
index 0 = K, 1 = V; slot s = page * page_size + row. Nothing outside pjllm.kernels indexes pages.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from pjllm.kernels import hopper_prefill as _hopper
from pjllm.kernels import paged_attention as _pallas
from pjllm.kernels import reference as _reference
from pjllm.kernels.attention_metadata import AttentionMetadata
from pjllm.sharding import MODEL_AXIS

BACKENDS = ("auto", "reference", "pallas")


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """How a model's attention runs, fixed once per engine: the kernels ("reference" or
    "pallas", resolved), and the mesh whose `model` axis splits attention heads across devices
    (None: one device). Models pass it through to `attention` without looking inside."""

    kernels: str
    mesh: Mesh | None = None

    @property
    def tensor_parallel(self) -> bool:
        return self.mesh is not None and self.mesh.shape[MODEL_AXIS] > 1


def allocate_kv_pages(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                      dtype: jnp.dtype, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
    """Zeroed KV pages of one layer: [2, num_kv_heads, num_pages, page_size, head_dim], placed
    with `sharding` (each device zeroes only its own part)."""
    shape = (2, num_kv_heads, num_pages, page_size, head_dim)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def read_pages(kv_pages: jax.Array, pages: jax.Array) -> jax.Array:
    """Pages `pages` (i32[B]) of one layer: [2, num_kv_heads, B, page_size, head_dim]."""
    return kv_pages[:, :, pages]


def write_pages(kv_pages: jax.Array, pages: jax.Array, data: jax.Array) -> jax.Array:
    """kv_pages with pages `pages` (i32[B]; an id past the last page writes nothing) set to
    `data` [2, num_kv_heads, B, page_size, head_dim]."""
    return kv_pages.at[:, :, pages].set(data.astype(kv_pages.dtype), mode="drop")


def kv_cache_bytes_per_page(page_size: int, num_kv_heads: int, head_dim: int,
                            dtype: jnp.dtype) -> int:
    """Bytes one page takes in one layer, K and V together."""
    return 2 * num_kv_heads * page_size * head_dim * np.dtype(dtype).itemsize


def write_kv(kv_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Writes this step's K/V into their slots; slot -1 writes nothing.

    kv_pages: [2, Hkv, P, page_size, D]; k, v: [T, Hkv, D]; slot_mapping: [T] int32.
    Returns the updated kv_pages (donate it to update in place).
    """
    return _reference.write_kv_reference(kv_pages, k, v, slot_mapping)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_pages: jax.Array,
              metadata: AttentionMetadata, *, sm_scale: float, backend: AttentionBackend,
              sliding_window: int | None = None,
              alibi_slopes: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Writes this step's K/V into the paged cache, then attends over it (`paged_attention`).

    q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_pages: [2, Hkv, P, page_size, D]. Returns (out
    [T, Hq, D], kv_pages with k and v written). Under tensor parallelism each device runs the
    kernels on its own heads (`shard_map` over the mesh's `model` axis: q, k, v, the pages and
    the ALiBi slopes split by head, the metadata whole), so attention needs no communication.
    """
    step = functools.partial(_write_and_attend, sm_scale=sm_scale, kernels=backend.kernels,
                             sliding_window=sliding_window)
    if not backend.tensor_parallel:
        return step(q, k, v, kv_pages, metadata, alibi_slopes)
    heads = PartitionSpec(None, MODEL_AXIS)
    slopes = None if alibi_slopes is None else PartitionSpec(MODEL_AXIS)
    metadata_spec = jax.tree.map(lambda _: PartitionSpec(), metadata)
    return jax.shard_map(step, mesh=backend.mesh,
                         in_specs=(heads, heads, heads, heads, metadata_spec, slopes),
                         out_specs=(heads, heads), check_vma=False)(
        q, k, v, kv_pages, metadata, alibi_slopes)


def _write_and_attend(q, k, v, kv_pages, metadata, alibi_slopes, *, sm_scale: float,
                      kernels: str, sliding_window: int | None):
    kv_pages = write_kv(kv_pages, k, v, metadata.slot_mapping)
    out = paged_attention(q, kv_pages, metadata, sm_scale=sm_scale, backend=kernels,
                          sliding_window=sliding_window, alibi_slopes=alibi_slopes)
    return out, kv_pages


def resolve_backend(backend: str) -> str:
    """"auto" -> "pallas" on GPU, "reference" elsewhere; other names pass through."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    return backend


def _runs_on_hopper_kernel(q: jax.Array, kv_pages: jax.Array, metadata: AttentionMetadata,
                           sliding_window: int | None, alibi_slopes: jax.Array | None) -> bool:
    """Whether a batch goes to the Mosaic GPU prefill kernel (hopper_prefill.py): on a Hopper
    GPU, for the batches the Triton kernel would run with its prefill tiles, when it
    supports their shapes and features. Decode buckets stay on the Triton kernel."""
    num_seqs = metadata.block_tables.shape[0]
    return (_hopper.on_hopper() and _pallas.kernel_mode(q.shape[0], num_seqs) == "prefill"
            and _hopper.supports(q, kv_pages, sliding_window=sliding_window,
                                 alibi=alibi_slopes is not None))


def paged_attention(q: jax.Array, kv_pages: jax.Array, metadata: AttentionMetadata, *,
                    sm_scale: float, backend: str = "auto",
                    sliding_window: int | None = None,
                    alibi_slopes: jax.Array | None = None) -> jax.Array:
    """Causal attention of a ragged batch (prefill chunks and decodes) over its paged KV.

    q: [T, Hq, D]; kv_pages: [2, Hkv, P, page_size, D] (this step's K/V already written);
    metadata: AttentionMetadata. Returns [T, Hq, D] in q.dtype; padding tokens give zeros.
    backend: "reference" (pure jnp), "pallas" (interpret mode automatically on CPU), or "auto".
    "pallas" runs the Triton kernels, and on a Hopper GPU the Mosaic GPU prefill kernel for the
    prefill batches it supports (16-bit, head_dim a multiple of 64, no window or ALiBi).
    sliding_window: each token attends to itself and the sliding_window - 1 keys before it (a
    layer's local attention); pages wholly before every token's window are not read.
    alibi_slopes: f32[Hq] (ALiBi): each score gets slope * (key position - query position).

    With metadata.common_prefix_len set this is cascade attention: every query token attends to
    the common prefix in one pass over it for the whole batch, and to the rest of its own context
    in the usual paged pass; the two softmax partials are then merged. Same result, but the
    prefix's KV is read a few times per step instead of once per sequence.
    """
    sm_scale = float(sm_scale)
    backend = resolve_backend(backend)
    interpret = jax.default_backend() == "cpu"
    if (metadata.common_prefix_len is None or sliding_window is not None
            or alibi_slopes is not None):
        # (A window may leave part of the common prefix behind, and the prefix pass has no
        # ALiBi: such layers run plain.)
        options = dict(sm_scale=sm_scale, sliding_window=sliding_window, alibi_slopes=alibi_slopes)
        if backend == "reference":
            return _reference.paged_attention_reference(q, kv_pages, metadata, **options)
        if not interpret and _runs_on_hopper_kernel(q, kv_pages, metadata, sliding_window,
                                                    alibi_slopes):
            return _hopper.prefill_attention(q, kv_pages, metadata, sm_scale=sm_scale)
        return _pallas.paged_attention(q, kv_pages, metadata, interpret=interpret, **options)
    suffix = metadata.after_common_prefix(kv_pages.shape[3])
    prefix_args = (q, kv_pages, metadata.block_tables[0], metadata.common_prefix_len,
                   metadata.query_start_loc[-1])
    if backend == "reference":
        parts = [_reference.paged_attention_partials_reference(q, kv_pages, suffix,
                                                               sm_scale=sm_scale),
                 _reference.prefix_attention_partials_reference(*prefix_args, sm_scale=sm_scale)]
    else:
        parts = [_pallas.paged_attention(q, kv_pages, suffix, sm_scale=sm_scale,
                                         interpret=interpret, partials=True),
                 _pallas.prefix_attention_partials(*prefix_args, sm_scale=sm_scale,
                                                   interpret=interpret)]
    acc, m, l = (jnp.concatenate(arrays) for arrays in zip(*parts))
    return _reference.combine_partials(acc, m, l, q.dtype).reshape(q.shape)
