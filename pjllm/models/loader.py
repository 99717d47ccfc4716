"""Builds a model's (graphdef, state) from a checkpoint, or with random weights (`dummy`)."""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pjllm.config import ModelConfig
from pjllm.models.registry import model_class
from pjllm.sharding import replicate_kv_heads, shard_state

logger = logging.getLogger(__name__)


def _path_key(path: tuple) -> str:
    return "/".join(str(part) for part in path)


def build_model(model_config: ModelConfig, dtype: jnp.dtype, load_format: str, model_path: str,
                seed: int = 0, mesh: Mesh | None = None,
                kv_head_replicas: int = 1) -> tuple[nnx.GraphDef, nnx.State]:
    """Returns the model split into (graphdef, state), weights on the default device, or on
    `mesh` placed by their logical axes (pjllm.sharding).

    With `kv_head_replicas` > 1, `model_config` has that many copies of each of the
    checkpoint's KV heads (tensor parallelism over more devices than KV heads) and the fused
    Q/K/V weights are split to match (`sharding.replicate_kv_heads`).

    `load_format="dummy"` draws random weights on the device from `seed` (no checkpoint needed);
    otherwise weights come from `model_path` (HF directory or GGUF file) cast to `dtype`.
    """
    start = time.perf_counter()
    model = model_class(model_config.architecture)
    if load_format == "dummy":
        # Eager construction: each parameter's random draw is its own small program. One jit over
        # the whole init makes XLA compile for minutes at 8B scale.
        graphdef, state = nnx.split(model(model_config, dtype, nnx.Rngs(seed)))
    else:
        from pjllm.models.weights import load_hf_state_dict

        hf_tensors = load_hf_state_dict(model_path, np.float32 if dtype == jnp.float32 else dtype)
        checkpoint_config = dataclasses.replace(
            model_config, num_kv_heads=model_config.num_kv_heads // kv_head_replicas)
        arrays = model.state_from_checkpoint(checkpoint_config, hf_tensors)
        del hf_tensors
        abstract = nnx.eval_shape(lambda: model(model_config, dtype, nnx.Rngs(seed)))
        graphdef, abstract_state = nnx.split(abstract)
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
        state = nnx.from_flat_state([(path, leaf) for (path, _), leaf in zip(flat, leaves)])
    if mesh is not None:
        state = shard_state(state, mesh)
    jax.block_until_ready(jax.tree.leaves(state))
    logger.info("model weights ready in %.1f s (%s)", time.perf_counter() - start, load_format)
    return graphdef, state
