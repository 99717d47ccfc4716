"""Running a model's layers: each one a nested jit, traced once for all the layers alike."""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx


@functools.partial(jax.jit, static_argnums=0, static_argnames="backend")
def _decoder_layer(graphdef: nnx.GraphDef, state: nnx.State, *args: Any, backend: Any) -> Any:
    # (Named for the profiles: a step's ops inside a layer carry "_decoder_layer" in their names.)
    return nnx.merge(graphdef, state)(*args, backend=backend)


def call_layer(layer: nnx.Module, *args: Any, backend: Any) -> Any:
    """layer(*args, backend=backend) as a pure function of its state. Jitted so that inside the
    step's trace every layer after the first reuses the first one's jaxpr and lowering (layers
    alike have equal graphdefs): tracing and lowering a step costs one layer of each kind, not
    num_layers (XLA inlines the calls, so the compiled program is unchanged)."""
    graphdef, state = nnx.split(layer)
    return _decoder_layer(graphdef, state, *args, backend=backend)


def run_layers(layers: list[nnx.Module], x: jax.Array, kv_caches: list[jax.Array],
               metadata: Any, *extra: Any, backend: Any) -> tuple[jax.Array, list[jax.Array]]:
    """x through each layer in turn, `layer(x, kv_pages, metadata, *extra, backend=backend)`,
    each with its own KV cache; returns (x, the updated caches)."""
    new_caches = []
    for layer, kv_pages in zip(layers, kv_caches):
        x, kv_pages = call_layer(layer, x, kv_pages, metadata, *extra, backend=backend)
        new_caches.append(kv_pages)
    return x, new_caches
