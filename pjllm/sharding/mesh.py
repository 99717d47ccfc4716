"""The device mesh and the rules that place a model's arrays on it.

A mesh has two axes: `data` (independent engine replicas) and `model` (tensor parallelism inside
one replica). Each data-parallel replica is an engine of its own, on a mesh of its own devices
(`replica_devices`), so an engine's mesh has a data axis of 1. Model parameters name logical
axes (`vocab`, `embed`, `heads`, `kv_heads`, `mlp`, ...; see `models/layers`);
LOGICAL_AXIS_RULES maps them onto the `model` axis Megatron-style: fused Q/K/V and gate/up split
by output heads / features (column parallel), o_proj and down_proj by their input (row
parallel, XLA adds the all-reduce), embeddings and the output layer by vocabulary. Models never
name mesh axes; only this module and the attention entry in `kernels/ops.py` (which runs the
kernels on each device's heads under `shard_map`) do.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, Sharding

ArrayT = TypeVar("ArrayT", np.ndarray, jax.Array)

DATA_AXIS = "data"
MODEL_AXIS = "model"

# Logical parameter axis -> mesh axis; axes not listed (embed, head_dim, qkv, ...) are replicated.
LOGICAL_AXIS_RULES: dict[str, str] = {
    "vocab": MODEL_AXIS,
    "heads": MODEL_AXIS,
    "kv_heads": MODEL_AXIS,
    "mlp": MODEL_AXIS,
}


def _check_device_count(tensor_parallel_size: int, data_parallel_size: int,
                        devices: Sequence[jax.Device]) -> None:
    wanted = tensor_parallel_size * data_parallel_size
    if wanted > len(devices):
        raise ValueError(f"tensor_parallel_size ({tensor_parallel_size}) x data_parallel_size "
                         f"({data_parallel_size}) = {wanted} devices, but only {len(devices)} "
                         f"are available")


def replica_devices(tensor_parallel_size: int, data_parallel_size: int, replica: int,
                    devices: Sequence[jax.Device] | None = None) -> list[jax.Device]:
    """The devices data-parallel replica `replica` owns: [replica x TP, (replica + 1) x TP) of
    `devices` (default: all of this process's backend's), so the replicas' sub-meshes are
    disjoint. Raises ValueError naming both sizes when TP x DP exceeds the devices."""
    devices = list(jax.devices() if devices is None else devices)
    _check_device_count(tensor_parallel_size, data_parallel_size, devices)
    if not 0 <= replica < data_parallel_size:
        raise ValueError(f"replica must be in [0, data_parallel_size ({data_parallel_size})); "
                         f"got {replica}")
    return devices[replica * tensor_parallel_size:(replica + 1) * tensor_parallel_size]


def make_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over the first data x tensor parallel devices (`devices`, default
    all of this process's backend's). Raises ValueError when there are too few. An engine
    replica's mesh has a data axis of 1 over its own devices (`replica_devices`)."""
    devices = list(jax.devices() if devices is None else devices)
    _check_device_count(tensor_parallel_size, data_parallel_size, devices)
    wanted = tensor_parallel_size * data_parallel_size
    # Auto axes: XLA propagates the parameters' shardings through the step (GSPMD) and adds
    # the collectives; only attention is split by hand (kernels/ops.py).
    return jax.make_mesh((data_parallel_size, tensor_parallel_size), (DATA_AXIS, MODEL_AXIS),
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[:wanted])


def kv_head_replicas(num_heads: int, num_kv_heads: int, tensor_parallel_size: int) -> int:
    """How many copies of each KV head the model runs with across `tensor_parallel_size`
    devices: 1 when the devices split the KV heads evenly; with fewer KV heads than devices,
    enough copies that each device holds one (as vLLM replicates them). Raises ValueError
    naming the field when the heads cannot be split so."""
    if num_heads % tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size ({tensor_parallel_size}) must divide the model's "
                         f"num_attention_heads ({num_heads})")
    if num_kv_heads % tensor_parallel_size == 0:
        return 1
    if tensor_parallel_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({tensor_parallel_size}) must divide the model's "
                         f"num_key_value_heads ({num_kv_heads}) or be a multiple of it")
    return tensor_parallel_size // num_kv_heads


def replicate_kv_heads(array: ArrayT, logical_axes: Sequence[str | None],
                       replicas: int) -> ArrayT:
    """A fused Q/K/V parameter (a `kv_heads` axis of Hkv followed by a `qkv` axis of G + 2: each
    KV head's G query heads, its key, its value) with every KV head split into `replicas` heads
    of G / replicas queries each, all with the same key and value. Query heads keep their order,
    so o_proj needs no change. Other parameters come back as they are. A numpy array stays on
    the host; a jax one (traced too) is copied where it lives."""
    axes = tuple(logical_axes)
    if replicas == 1 or "kv_heads" not in axes or "qkv" not in axes:
        return array
    xp = jnp if isinstance(array, jax.Array) else np
    head_axis = axes.index("kv_heads")
    group = array.shape[head_axis + 1] - 2
    queries, key_value = xp.split(array, [group], axis=head_axis + 1)
    shape = queries.shape
    queries = queries.reshape(*shape[:head_axis + 1], replicas, group // replicas, *shape[head_axis + 2:])
    key_value = xp.repeat(xp.expand_dims(key_value, head_axis + 1), replicas, axis=head_axis + 1)
    fused = xp.concatenate([queries, key_value], axis=head_axis + 2)
    return fused.reshape(*shape[:head_axis], shape[head_axis] * replicas, group // replicas + 2,
                         *shape[head_axis + 2:])


def _spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes: each mapped axis on its mesh axis
    where the mesh divides it, else replicated (e.g. a vocabulary of odd size)."""
    parts: list[str | None] = []
    used: set[str] = set()
    for axis, size in zip(logical_axes, shape):
        mesh_axis = LOGICAL_AXIS_RULES.get(axis) if axis is not None else None
        if mesh_axis is None or mesh_axis in used or size % mesh.shape[mesh_axis]:
            parts.append(None)
        else:
            parts.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*parts)


def param_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """Where one model variable lives: by its `logical_axes` metadata, replicated without it."""
    value = variable.get_value()
    axes = variable.get_metadata().get("logical_axes") or (None,) * value.ndim
    return NamedSharding(mesh, _spec(axes, value.shape, mesh))


def place_host_array(array: np.ndarray, sharding: Sharding) -> jax.Array:
    """`array` (on the host) as a jax.Array laid out by `sharding`: each device is sent only
    its own slice (`jax.make_array_from_callback`), so no device ever holds more of a split
    array than its shard."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    """One layer's KV pages [2, Hkv, P, page_size, D], split by KV head."""
    return NamedSharding(mesh, PartitionSpec(None, MODEL_AXIS))


def vocab_sharded(mesh: Mesh) -> NamedSharding:
    """Logits [rows, vocab] split by vocabulary, as the output layer computes them."""
    return NamedSharding(mesh, PartitionSpec(None, LOGICAL_AXIS_RULES["vocab"]))


def replicated(mesh: Mesh) -> NamedSharding:
    """An array every device of the mesh holds whole (step inputs, logits, sampled tokens)."""
    return NamedSharding(mesh, PartitionSpec())
