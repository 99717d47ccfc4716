"""Attention for the families: the one entry they call (`kernels.ops.attention`, as
`paged_attention`: write this step's K/V, attend over the paged cache, per device's heads under
tensor parallelism), the backend object they pass through to it, and ALiBi's slopes."""

from __future__ import annotations

import math

import numpy as np

from pjllm.kernels.ops import AttentionBackend
from pjllm.kernels.ops import attention as paged_attention

__all__ = ["AttentionBackend", "alibi_slopes", "paged_attention"]


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes f32[num_heads] (Press et al.; BLOOM's and Falcon-RW's): a geometric
    sequence from 2^(-8/n) for the largest power of two n <= num_heads, then every other term of
    the sequence for 2n, for the heads past n."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** i for i in range(1, closest + 1)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** i for i in range(1, 2 * (num_heads - closest), 2)]
    return np.asarray(slopes, np.float32)
