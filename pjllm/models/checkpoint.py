"""Naming helpers for the families' transformers checkpoints (tensor names -> shapes, and
tensors -> module state, yielded one variable at a time)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

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


def layer_norm_state(hf: Mapping[str, np.ndarray], ours: str, theirs: str,
                     names: tuple[str, ...]) -> Iterator[tuple[str, np.ndarray]]:
    """LayerNorms `theirs + name` (weight and bias) as the state of `ours + name`, one
    (path, array) pair per variable."""
    for name in names:
        for kind in ("weight", "bias"):
            yield f"{ours}{name}/{kind}", hf[f"{theirs}{name}.{kind}"]
