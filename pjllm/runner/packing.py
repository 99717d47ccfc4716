"""One host-to-device copy per step: the step's input arrays packed into two int32 buffers.

A step has some twenty small input arrays; copying each to the device on its own cost about
1.2 ms a step on CPU and most of the 6 ms that dispatching a step took on an H200 (docs/perf.md),
against 0.2 ms for one packed copy. Every input is 4 bytes an element, so the host lays the
arrays end to end as int32 bits and the programs slice and bitcast them back.

The sampler reads only the per-sequence inputs (`SEQUENCE_INPUTS`); they get their own buffer,
whose size depends only on the sequence bucket N, so one sampler program serves every token
bucket with that N. The forward reads both buffers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The StepInput leaves (by key path) that the sampler reads: in the per-sequence buffer.
SEQUENCE_INPUTS = (".sampling", ".seq_rows", ".attention.seq_lens")


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where a pytree's leaves lie in the buffers: static, so it is a compile-time constant.

    treedef: the tree's structure; in_sequence_buffer: per leaf, which buffer holds it;
    shapes, dtypes: per leaf.
    """

    treedef: Any
    in_sequence_buffer: tuple[bool, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]


def _is_sequence_input(path: tuple) -> bool:
    name = jax.tree_util.keystr(path)
    return any(name == field or name.startswith(field + ".") for field in SEQUENCE_INPUTS)


def layout_of(tree: Any) -> PackedLayout:
    """The layout of `tree`'s leaves (numpy arrays or ShapeDtypeStructs of 4-byte dtypes)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in paths:
        assert np.dtype(leaf.dtype).itemsize == 4, (jax.tree_util.keystr(path), leaf.dtype)
    return PackedLayout(treedef, tuple(_is_sequence_input(path) for path, _ in paths),
                        tuple(tuple(leaf.shape) for _, leaf in paths),
                        tuple(np.dtype(leaf.dtype).name for _, leaf in paths))


def buffer_sizes(layout: PackedLayout) -> tuple[int, int]:
    """(per-token buffer, per-sequence buffer) lengths in int32 elements."""
    sizes = [0, 0]
    for in_sequence, shape in zip(layout.in_sequence_buffer, layout.shapes):
        sizes[in_sequence] += int(np.prod(shape))
    return sizes[0], sizes[1]


def pack(tree: Any) -> tuple[np.ndarray, np.ndarray]:
    """The leaves of `tree` (host numpy arrays) as (per-token i32[A], per-sequence i32[B])."""
    paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    parts: tuple[list, list] = ([], [])
    for path, leaf in paths:
        parts[_is_sequence_input(path)].append(np.asarray(leaf).view(np.int32).ravel())
    return tuple(np.concatenate(part) if part else np.zeros(0, np.int32) for part in parts)


def unpack(layout: PackedLayout, token_buffer: jax.Array | None,
           sequence_buffer: jax.Array) -> Any:
    """The tree packed into the buffers, inside a program. With `token_buffer` None, only the
    per-sequence leaves come back (the others are None)."""
    offsets = [0, 0]
    buffers = (token_buffer, sequence_buffer)
    leaves = []
    for in_sequence, shape, dtype in zip(layout.in_sequence_buffer, layout.shapes, layout.dtypes):
        size, start = int(np.prod(shape)), offsets[in_sequence]
        offsets[in_sequence] += size
        buffer = buffers[in_sequence]
        if buffer is None:
            leaves.append(None)
            continue
        leaf = jax.lax.bitcast_convert_type(buffer[start:start + size], jnp.dtype(dtype))
        leaves.append(leaf.reshape(shape))
    return jax.tree.unflatten(layout.treedef, leaves)


def abstract_buffers(layout: PackedLayout) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """The buffers' shapes, to lower a program with."""
    return tuple(jax.ShapeDtypeStruct((size,), jnp.int32) for size in buffer_sizes(layout))
