"""Naming helpers for the families' transformers checkpoints (tensor names -> shapes, and
tensors -> module state)."""

from __future__ import annotations

from typing import Any

import numpy as np


def layer_norm_shapes(prefix: str, names: tuple[str, ...], dim: int) -> dict[str, tuple[int, ...]]:
    """The weight and bias shapes of LayerNorms `prefix + name`."""
    return {f"{prefix}{name}.{kind}": (dim,) for name in names for kind in ("weight", "bias")}


def linear_shapes(prefix: str, layers: dict[str, tuple[int, int]],
                  bias: bool = True) -> dict[str, tuple[int, ...]]:
    """The weight [rows, cols] (and bias [rows]) shapes of linear layers `prefix + name`."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (rows, cols) in layers.items():
        shapes[f"{prefix}{name}.weight"] = (rows, cols)
        if bias:
            shapes[f"{prefix}{name}.bias"] = (rows,)
    return shapes


def copy_layer_norms(state: dict[str, Any], hf: dict[str, np.ndarray], ours: str, theirs: str,
                     names: tuple[str, ...]) -> None:
    """Copies LayerNorms `theirs + name` (weight and bias) to `ours + name` in `state`."""
    for name in names:
        for kind in ("weight", "bias"):
            state[f"{ours}{name}/{kind}"] = hf[f"{theirs}{name}.{kind}"]
