"""Builds a model's (graphdef, state) from a checkpoint, or with random weights (`dummy`), each
array made straight on the devices that hold it.

No device ever holds more of a split parameter than its shard, and no host the whole model:
- a checkpoint is streamed: the family's `state_from_checkpoint` yields one variable at a time,
  reading only the tensors that variable needs (`weights.open_hf_state_dict` reads lazily), and
  each is sent to its devices, every device getting only its slice
  (`sharding.place_host_array`), before the next is read, so the host holds about one
  converted parameter at a time;
- dummy weights are drawn by jitted programs whose outputs have the parameters' shardings, so
  each device draws only its own slice;
- an orbax checkpoint is restored with every array's target sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, Sharding, SingleDeviceSharding

from pjllm.config import ModelConfig
from pjllm.models.layers import draw_normal
from pjllm.models.registry import model_class
from pjllm.sharding import param_sharding, place_host_array, replicate_kv_heads

logger = logging.getLogger(__name__)


def _path_key(path: tuple) -> str:
    return "/".join(str(part) for part in path)


def build_model(model_config: ModelConfig, dtype: jnp.dtype, load_format: str, model_path: str,
                seed: int = 0, mesh: Mesh | None = None,
                kv_head_replicas: int = 1) -> tuple[nnx.GraphDef, nnx.State]:
    """Returns the model split into (graphdef, state), each variable on `mesh` placed by its
    logical axes (`sharding.param_sharding`), or on the default device without a mesh.

    `load_format="dummy"` draws random weights on the devices from `seed`, no checkpoint needed:
    each random parameter from the model's own initial distribution (N(0, std^2), e.g. std =
    1 / sqrt(fan-in) for a linear kernel) keyed by its path, the same values on any mesh; norm
    weights, biases and buffers as the constructor sets them (`_dummy_state`). "orbax" restores
    a `pjllm convert` checkpoint, each device reading its own slices; otherwise weights come
    from `model_path` (HF directory or GGUF file) cast to `dtype`, one parameter at a time. With `kv_head_replicas` > 1, `model_config` has
    that many copies of each of the checkpoint's KV heads (tensor parallelism over more devices
    than KV heads) and the fused Q/K/V weights are split to match (`sharding.replicate_kv_heads`).
    """
    start = time.perf_counter()
    model = model_class(model_config.architecture)
    checkpoint_config = dataclasses.replace(
        model_config, num_kv_heads=model_config.num_kv_heads // kv_head_replicas)
    graphdef, abstract_state = _abstract_model(model, model_config, dtype, seed)
    if load_format == "dummy":
        state = _dummy_state(model, model_config, checkpoint_config, dtype, seed, abstract_state,
                             mesh, kv_head_replicas)
    elif load_format == "orbax" and kv_head_replicas == 1:
        state = _restore_orbax(model_path, abstract_state, mesh)
    else:
        values: Iterable[tuple[str, Any]]
        if load_format == "orbax":  # saved with the checkpoint's heads: copied on the devices
            _, saved = _abstract_model(model, checkpoint_config, dtype, seed)
            values = ((_path_key(path), variable.get_value()) for path, variable
                      in nnx.to_flat_state(_restore_orbax(model_path, saved, mesh)))
        else:
            from pjllm.models.weights import open_hf_state_dict

            values = model.state_from_checkpoint(checkpoint_config, open_hf_state_dict(
                model_path, np.float32 if dtype == jnp.float32 else dtype))
        state = _place_values(abstract_state, values, mesh, kv_head_replicas)
    jax.block_until_ready(jax.tree.leaves(state))
    logger.info("model weights ready in %.1f s (%s)", time.perf_counter() - start, load_format)
    return graphdef, state


def _abstract_model(model: type, config: ModelConfig, dtype: Any,
                    seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graphdef and its state's shapes and dtypes, holding no memory."""
    return nnx.split(nnx.eval_shape(lambda: model(config, dtype, nnx.Rngs(seed))))


def _sharding(variable: nnx.Variable, mesh: Mesh | None) -> Sharding:
    """Where `variable` lives: by its logical axes on `mesh`, or whole on the default device."""
    return param_sharding(variable, mesh) if mesh is not None else SingleDeviceSharding(
        jax.devices()[0])


def _logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    return tuple(variable.get_metadata().get("logical_axes") or ())


def _restore_orbax(path: str, abstract_state: nnx.State, mesh: Mesh | None) -> nnx.State:
    """A `pjllm convert` checkpoint restored in `abstract_state`'s layout, each variable placed
    as `_sharding` places it."""
    from pjllm.models.orbax_checkpoint import restore_state

    shardings = nnx.to_pure_dict(nnx.from_flat_state([
        (key, variable.replace(_sharding(variable, mesh)))
        for key, variable in nnx.to_flat_state(abstract_state)]))
    return restore_state(path, abstract_state, shardings)


def _place_values(abstract_state: nnx.State, values: Iterable[tuple[str, Any]],
                  mesh: Mesh | None, kv_head_replicas: int) -> nnx.State:
    """`abstract_state` filled from `values`: ('/'-joined path, array) pairs in the
    checkpoint's KV heads, every variable once, numpy arrays or jax ones. Each array is checked
    against its variable's shape, cast to its dtype and placed on its devices before the next
    pair is asked for. Raises ValueError for a misshaped, unknown, repeated or missing one."""
    flat = nnx.to_flat_state(abstract_state)
    variables = {_path_key(path): variable for path, variable in flat}
    placed: dict[str, jax.Array] = {}
    for key, array in values:
        if key not in variables or key in placed:
            raise ValueError(f"checkpoint conversion gave {key!r} "
                             + ("twice" if key in placed else "which the model does not have"))
        variable = variables[key]
        array = replicate_kv_heads(array, _logical_axes(variable), kv_head_replicas)
        expected = variable.get_value()
        if tuple(array.shape) != tuple(expected.shape):
            raise ValueError(f"parameter {key!r} has shape {array.shape}, expected "
                             f"{expected.shape}")
        sharding = _sharding(variable, mesh)
        if isinstance(array, jax.Array):
            placed[key] = jax.device_put(array.astype(expected.dtype), sharding)
        else:
            placed[key] = place_host_array(np.asarray(array, expected.dtype), sharding)
        # Dropped before the generator builds the next variable: the host holds one at a time.
        del array
    missing = [key for key in variables if key not in placed]
    if missing:
        raise ValueError(f"checkpoint conversion gave no value for {missing[0]!r} "
                         f"({len(missing)} variables missing)")
    return nnx.from_flat_state([(path, variable.replace(placed[_path_key(path)]))
                                for path, variable in flat])


def _dummy_state(model: type, config: ModelConfig, checkpoint_config: ModelConfig, dtype: Any,
                 seed: int, abstract_state: nnx.State, mesh: Mesh | None,
                 kv_head_replicas: int) -> nnx.State:
    """Random weights, made on their devices.

    A parameter the model draws from N(0, std^2) (`layers.init_param`, which records `init_std`)
    is drawn from that distribution again, keyed by `seed` and the parameter's path, by a jitted
    program whose output has the parameter's sharding: with JAX's partitionable threefry each
    device draws only its slice, and the values do not depend on the sharding, so every
    tensor-parallel degree gets the same model (fused Q/K/V is drawn in the checkpoint's KV
    heads and copied as a checkpoint's would be). The values differ from the eager
    `model(config, dtype, nnx.Rngs(seed))`, whose keys follow construction order. Everything
    else (norm weights, zero biases, rotary frequencies, ALiBi slopes) gets the exact value the
    constructor gives it.
    """
    flat = nnx.to_flat_state(abstract_state)
    drawn = {_path_key(path) for path, variable in flat if "init_std" in variable.get_metadata()}
    checkpoint_shapes: dict[str, tuple[int, ...]] = {}
    if kv_head_replicas > 1:
        _, saved = _abstract_model(model, checkpoint_config, dtype, seed)
        checkpoint_shapes = {_path_key(path): variable.get_value().shape
                             for path, variable in nnx.to_flat_state(saved)}

    def constructed() -> dict[str, jax.Array]:
        # The constructor traced whole: the random draws it makes are not returned, so JAX
        # leaves them out of the program, which compiles in well under a second at 8B.
        built = nnx.to_flat_state(nnx.state(model(config, dtype, nnx.Rngs(seed))))
        return {_path_key(path): variable.get_value() for path, variable in built
                if _path_key(path) not in drawn}

    values = jax.jit(constructed, out_shardings={
        _path_key(path): _sharding(variable, mesh) for path, variable in flat
        if _path_key(path) not in drawn})()
    # Partitionable threefry is what lets each device draw only its own slice (without it XLA
    # draws the whole tensor on every device and slices it); JAX's default, pinned here.
    with jax.threefry_partitionable(True):
        for path, variable in flat:
            key = _path_key(path)
            if key in drawn:
                abstract = variable.get_value()
                values[key] = _draw_program(_sharding(variable, mesh))(
                    seed, checkpoint_shapes.get(key, abstract.shape), abstract.dtype,
                    variable.get_metadata()["init_std"], _logical_axes(variable),
                    kv_head_replicas, np.uint32(zlib.crc32(key.encode())))
    return nnx.from_flat_state([(path, variable.replace(values[_path_key(path)]))
                                for path, variable in flat])


@functools.cache
def _draw_program(sharding: Sharding) -> Callable[..., jax.Array]:
    """`_draw` compiled to make its values with `sharding`. One compile per distinct draw (the
    salt is data): a model's layers share them, and so do engines built later in the process."""
    return jax.jit(_draw, static_argnums=range(6), out_shardings=sharding)


def _draw(seed: int, shape: tuple[int, ...], dtype: Any, std: float,
          logical_axes: tuple[str | None, ...], kv_head_replicas: int,
          salt: jax.Array) -> jax.Array:
    """N(0, std^2) values of `shape` from `seed` folded with `salt` (the parameter's path
    hashed), with a fused Q/K/V's KV heads copied `kv_head_replicas` times."""
    value = draw_normal(jax.random.fold_in(jax.random.key(seed), salt), shape, dtype, std)
    return replicate_kv_heads(value, logical_axes, kv_head_replicas)
