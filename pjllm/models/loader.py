"""Builds a model's (graphdef, state) from a checkpoint, or with random weights (`dummy`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from pjllm.config import ModelConfig
from pjllm.models.registry import model_class
from pjllm.sharding import param_sharding, replicate_kv_heads, shard_state

logger = logging.getLogger(__name__)


def _path_key(path: tuple) -> str:
    return "/".join(str(part) for part in path)


def build_model(model_config: ModelConfig, dtype: jnp.dtype, load_format: str, model_path: str,
                seed: int = 0, mesh: Mesh | None = None,
                kv_head_replicas: int = 1) -> tuple[nnx.GraphDef, nnx.State]:
    """Returns the model split into (graphdef, state), weights on the default device, or on
    `mesh` placed by their logical axes (pjllm.sharding).

    `load_format="dummy"` draws random weights on the device from `seed` (no checkpoint needed);
    "orbax" restores a `pjllm convert` checkpoint, each device reading its own slices; otherwise
    weights come from `model_path` (HF directory or GGUF file) cast to `dtype`.
    With `kv_head_replicas` > 1, `model_config` has that many copies of each of the
    checkpoint's KV heads (tensor parallelism over more devices than KV heads) and the fused
    Q/K/V weights are split to match (`sharding.replicate_kv_heads`).
    """
    start = time.perf_counter()
    model = model_class(model_config.architecture)
    checkpoint_config = dataclasses.replace(
        model_config, num_kv_heads=model_config.num_kv_heads // kv_head_replicas)
    if load_format == "dummy":
        # Eager construction: each parameter's random draw is its own small program. One jit over
        # the whole init makes XLA compile for minutes at 8B scale.
        graphdef, state = nnx.split(model(model_config, dtype, nnx.Rngs(seed)))
    elif load_format == "orbax" and kv_head_replicas == 1:
        graphdef, abstract_state = _abstract_model(model, model_config, dtype, seed)
        state = _restore_orbax(model_path, abstract_state, mesh)
    else:
        if load_format == "orbax":  # saved with the checkpoint's heads: copied below
            _, saved = _abstract_model(model, checkpoint_config, dtype, seed)
            arrays = {_path_key(path): np.asarray(variable.get_value()) for path, variable
                      in nnx.to_flat_state(_restore_orbax(model_path, saved, None))}
        else:
            from pjllm.models.weights import load_hf_state_dict

            hf_tensors = load_hf_state_dict(model_path,
                                            np.float32 if dtype == jnp.float32 else dtype)
            arrays = model.state_from_checkpoint(checkpoint_config, hf_tensors)
            del hf_tensors
        graphdef, state = _state_from_arrays(model, model_config, dtype, seed, arrays,
                                             kv_head_replicas)
    if mesh is not None:
        state = shard_state(state, mesh)
    jax.block_until_ready(jax.tree.leaves(state))
    logger.info("model weights ready in %.1f s (%s)", time.perf_counter() - start, load_format)
    return graphdef, state


def _abstract_model(model: type, config: ModelConfig, dtype: Any,
                    seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graphdef and its state's shapes and dtypes, holding no memory."""
    return nnx.split(nnx.eval_shape(lambda: model(config, dtype, nnx.Rngs(seed))))


def _restore_orbax(path: str, abstract_state: nnx.State, mesh: Mesh | None) -> nnx.State:
    """A `pjllm convert` checkpoint restored in `abstract_state`'s layout, onto `mesh` (each
    variable as `param_sharding` places it) or the default device."""
    from pjllm.models.orbax_checkpoint import restore_state

    device = SingleDeviceSharding(jax.devices()[0])
    shardings = nnx.to_pure_dict(nnx.from_flat_state([
        (key, variable.replace(param_sharding(variable, mesh) if mesh is not None else device))
        for key, variable in nnx.to_flat_state(abstract_state)]))
    return restore_state(path, abstract_state, shardings)


def _state_from_arrays(model: type, config: ModelConfig, dtype: Any, seed: int,
                       arrays: dict[str, np.ndarray],
                       kv_head_replicas: int) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's (graphdef, state) with its variables set from `arrays` ('/'-joined paths, in
    the checkpoint's KV heads), each checked against the shape it must have."""
    graphdef, abstract_state = _abstract_model(model, config, dtype, seed)
    flat = nnx.to_flat_state(abstract_state)
    leaves = []
    for path, variable in flat:
        key = _path_key(path)
        array = replicate_kv_heads(arrays.pop(key), variable.get_metadata().get(
            "logical_axes") or (), kv_head_replicas)
        expected = variable.get_value().shape
        if tuple(array.shape) != tuple(expected):
            raise ValueError(f"parameter {key!r} has shape {array.shape}, expected {expected}")
        # Parameters in the model's dtype; buffers (rotary frequencies) keep their own.
        leaves.append(variable.replace(jnp.asarray(
            array, dtype=dtype if isinstance(variable, nnx.Param) else array.dtype)))
    return graphdef, nnx.from_flat_state([(path, leaf) for (path, _), leaf in zip(flat, leaves)])
