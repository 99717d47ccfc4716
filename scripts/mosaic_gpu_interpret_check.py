"""On CPU: which Mosaic GPU constructs jax 0.11.2's GPU interpret mode runs, for developing a
Hopper kernel (TMA, swizzled shared memory, wgmma) before a GPU is at hand.

    JAX_PLATFORMS=cpu python scripts/mosaic_gpu_interpret_check.py

1. minimal: a TMA copy of A [64, 64] and B [64, 64] (float16) into swizzled shared memory, then
   two wgmma into a float32 accumulator in a fori_loop, stored back by TMA: must equal 2 A @ B.
2. fa3: jax's bundled Hopper flash attention (jax.experimental.pallas.ops.gpu.attention_mgpu,
   which warp-specialises one memory and two compute warpgroups), causal, [1, 128, 2, 64].

Found (2026-12-02): minimal passes exactly. fa3 fails with "Cannot lower jaxpr with effects:
{IOEffect, _WGMMAPipelineEffect, MemoryEffect}", so a kernel built like it cannot be tested on CPU
as it is; one built from the constructs of 1 can (pjllm/kernels/hopper_prefill.py is). Also found
building that kernel: the interpreter's wgmma takes its left operand from shared memory only (a
register operand fails), and an accumulator initialised from a value (`ACC.init`) fails; the
GPU lowering itself runs on CPU (`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`),
which catches Mosaic GPU's layout-inference errors before a GPU is at hand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SIZE = 64


def minimal() -> float:
    """Max |kernel - 2 A @ B| of the TMA + swizzled SMEM + looped wgmma kernel."""
    def kernel(a_gmem, b_gmem, o_gmem):
        def body(a_smem, b_smem, o_smem, barrier):
            def accumulate(acc_ref):
                def step(_, carry):
                    plgpu.wgmma(acc_ref, a_smem, b_smem)
                    plgpu.wgmma_wait(0)
                    return carry
                jax.lax.fori_loop(0, 2, step, 0)
                o_smem[...] = acc_ref[...]
            for src, dst in ((a_gmem, a_smem), (b_gmem, b_smem)):
                plgpu.copy_gmem_to_smem(src, dst, barrier)
                plgpu.barrier_wait(barrier)
            pl.run_scoped(accumulate, plgpu.ACC((SIZE, SIZE), jnp.float32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem)
            plgpu.wait_smem_to_gmem(0)
        swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        pl.run_scoped(body, plgpu.SMEM((SIZE, SIZE), jnp.float16, transforms=swizzled),
                      plgpu.SMEM((SIZE, SIZE), jnp.float16, transforms=swizzled),
                      plgpu.SMEM((SIZE, SIZE), jnp.float32), plgpu.Barrier(num_arrivals=1))

    a = jax.random.normal(jax.random.key(0), (SIZE, SIZE), jnp.float16)
    b = jax.random.normal(jax.random.key(1), (SIZE, SIZE), jnp.float16)
    run = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((SIZE, SIZE), jnp.float32),
                       interpret=InterpretGPUParams())
    want = 2 * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    return float(jnp.max(jnp.abs(run(a, b) - want)))


def fa3() -> float:
    """Max |kernel - reference| of jax's bundled flash attention, run in interpret mode."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    kernel = plgpu.kernel  # the module attention_mgpu calls it through is this one

    def interpreted(*args, **kwargs):
        kwargs.setdefault("interpret", InterpretGPUParams())
        return kernel(*args, **kwargs)

    class CudaVersions:  # the kernel asks for the CUDA runtime's version; CPU has none
        @staticmethod
        def cuda_runtime_get_version() -> int:
            return 13000

    attention_mgpu.plgpu.kernel = interpreted
    attention_mgpu.cuda_versions = CudaVersions()
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 128, 2, 64), jnp.float16) for i in range(3))
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, causal=True)
    out = attention_mgpu.attention(q, k, v, config)
    want = attention_mgpu.attention_reference(q, k, v, causal=True)
    return float(jnp.max(jnp.abs(out.astype(jnp.float32) - want)))


def main() -> None:
    for name, check in (("minimal", minimal), ("fa3", fa3)):
        try:
            print(f"{name}: max abs error {check():.3g}")
        except Exception as error:  # noqa: BLE001 - report what interpret mode cannot run
            # a callback's error carries the interpreter's traceback: its last line is the cause
            cause = [line for line in str(error).splitlines() if line.strip()][-1]
            print(f"{name}: failed, {type(error).__name__}: {cause[:300]}")


if __name__ == "__main__":
    main()
