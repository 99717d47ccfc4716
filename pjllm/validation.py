"""What counts as an integer and as a number in user input (SamplingParams, EngineConfig, prompts).

Both accept numpy scalars; neither accepts a bool (Python's True is an int, never a count here).
Numbers must stay finite in float32, the dtype the device computes sampling parameters in.
"""

from __future__ import annotations

import numbers

import numpy as np

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_int(value: object) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_float32(value: object) -> float | None:
    """`value` as the float the device will see (rounded to float32), or None when it is not a
    real number or not finite in float32 (NaN, inf, 1e39)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None
    try:
        as_float = float(value)
    except OverflowError:  # an integer too large for a float
        return None
    if not abs(as_float) <= _FLOAT32_MAX:  # also False for NaN
        return None
    return float(np.float32(as_float))
