"""How many KV pages an engine may allocate: its share of the device's memory, as in vLLM.

`gpu_memory_utilization` is the share of the device's total memory that one engine's weights, KV
cache and step activations may use together. Two engines at 0.4 each fit side by side, in one
process or in two: `import pjllm` makes JAX allocate GPU memory on demand rather than claim most
of the device at start (see pjllm/__init__.py).
"""

from __future__ import annotations

import ctypes
import functools
import logging

import jax

logger = logging.getLogger(__name__)

# Without device memory statistics (CPU), the KV cache gets at most this many bytes.
HOST_KV_CACHE_BYTES = 1 << 30


@functools.lru_cache(maxsize=None)
def _cuda_total_memory(ordinal: int) -> int | None:
    """Total memory of CUDA device `ordinal` from the driver (no context needed), or None."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, total = ctypes.c_int(), ctypes.c_size_t()
    if (cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0
            or cuda.cuDeviceTotalMem_v2(ctypes.byref(total), device) != 0):
        return None
    return total.value


def device_total_memory(device: jax.Device) -> int | None:
    """Bytes of memory `device` has in all (NVIDIA GPUs), or None where that is unknown."""
    if device.platform != "gpu":
        return None
    return _cuda_total_memory(device.local_hardware_id)


def kv_cache_budget(*, utilization: float, total_bytes: int, pool_limit_bytes: int,
                    pool_in_use_bytes: int, weights_bytes: int, activation_bytes: int) -> int:
    """Bytes the KV cache may take on a device.

    The engine's share is `utilization` x `total_bytes`, less its own weights and step
    activations; memory other engines hold does not count against it. It is capped by what
    this process's allocator can still hand out (`pool_limit_bytes` - `pool_in_use_bytes`,
    less the activations).
    """
    share = utilization * total_bytes - weights_bytes - activation_bytes
    headroom = pool_limit_bytes - pool_in_use_bytes - activation_bytes
    return int(min(share, headroom))


def kv_cache_bytes(device: jax.Device, *, utilization: float, weights_bytes: int,
                   activation_bytes: int, host_bytes_wanted: int) -> int:
    """The KV cache's byte budget on `device` (see kv_cache_budget); on the host (no allocator
    statistics), the bytes wanted up to HOST_KV_CACHE_BYTES x utilization."""
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:  # the host: no allocator statistics
        return int(min(host_bytes_wanted, HOST_KV_CACHE_BYTES * utilization))
    # Where the driver cannot say (accelerators other than CUDA), the allocator's limit stands in.
    total = device_total_memory(device) or stats["bytes_limit"]
    # The cudaMallocAsync pool (pjllm/__init__.py) reports no limit (0): the device's is the cap.
    pool_limit = stats["bytes_limit"] or total
    budget = kv_cache_budget(utilization=utilization, total_bytes=total,
                             pool_limit_bytes=pool_limit,
                             pool_in_use_bytes=stats.get("bytes_in_use", 0),
                             weights_bytes=weights_bytes, activation_bytes=activation_bytes)
    logger.info("device memory %.1f GiB; this engine's share %.1f GiB: weights %.1f GiB, "
                "activations %.1f GiB, KV cache %.1f GiB", total / 2**30, utilization * total / 2**30,
                weights_bytes / 2**30, activation_bytes / 2**30, max(budget, 0) / 2**30)
    return budget
