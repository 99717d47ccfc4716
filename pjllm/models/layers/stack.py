"""Running a model's layers: each one a nested jit, traced once for all the layers alike."""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx


@functools.partial(jax.jit, static_argnums=0, static_argnames="backend")
def _decoder_layer(graphdef: nnx.GraphDef, state: nnx.State, *args: Any, backend: str) -> Any:
    # (Named for the profiles: a step's ops inside a layer carry "_decoder_layer" in their names.)
    return nnx.merge(graphdef, state)(*args, backend=backend)


def call_layer(layer: nnx.Module, *args: Any, backend: str) -> Any:
    """layer(*args, backend=backend) as a pure function of its state. Jitted so that inside the
    step's trace every layer after the first reuses the first one's jaxpr and lowering (layers
    alike have equal graphdefs): tracing and lowering a step costs one layer of each kind, not
    num_layers (XLA inlines the calls, so the compiled program is unchanged)."""
    graphdef, state = nnx.split(layer)
    return _decoder_layer(graphdef, state, *args, backend=backend)
