"""How long JAX's GPU allocators take to hand out a KV cache's worth of memory.

    python -m benchmarks.allocator_time default    # growing on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false)
    python -m benchmarks.allocator_time prealloc   # 95% of the device claimed at start
    python -m benchmarks.allocator_time cuda_async # a cudaMallocAsync pool (pjllm's default)

Prints the backend's start, 64 allocations of 100 MB (weight-sized), 16 of 3.1 GB (one layer of
the Llama-3-8B KV cache on an H200) one per call and eight per call, and the 16 again once
freed. Programs are compiled before the clock starts, without allocating. Run one allocator
per process: the choice is read when the backend starts.
"""

from __future__ import annotations

import os
import sys
import time


def main(mode: str) -> None:
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true" if mode == "prealloc" else "false"
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.95"
    os.environ["XLA_PYTHON_CLIENT_ALLOCATOR"] = "cuda_async" if mode == "cuda_async" else "default"
    import jax
    import jax.numpy as jnp

    start = time.perf_counter()
    jnp.zeros(4).block_until_ready()
    backend_s = time.perf_counter() - start
    layer = (2, 8, 48000, 16, 128)  # 3.1 GB of bf16
    one_layer = jax.jit(lambda: jnp.zeros(layer, jnp.bfloat16)).lower().compile()
    eight_layers = jax.jit(lambda: [jnp.zeros(layer, jnp.bfloat16) for _ in range(8)]).lower().compile()
    weight = jax.jit(lambda: jnp.zeros((4096, 3 * 4096), jnp.bfloat16)).lower().compile()

    def timed(make):
        start = time.perf_counter()
        arrays = make()
        jax.block_until_ready(arrays)
        return time.perf_counter() - start, arrays

    weights_s, _ = timed(lambda: [weight() for _ in range(64)])
    one_s, first = timed(lambda: [one_layer() for _ in range(16)])
    eight_s, second = timed(lambda: [eight_layers() for _ in range(2)])
    del first, second
    again_s, _ = timed(lambda: [one_layer() for _ in range(16)])
    print(f"{mode}: backend start {backend_s:.2f} s; 64 x 100 MB {weights_s:.2f} s; 16 x 3.1 GB "
          f"one per call {one_s:.2f} s, eight per call {eight_s:.2f} s; again once freed {again_s:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda_async")
