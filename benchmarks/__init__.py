"""Tools beside the package, run from the repository root (`python -m benchmarks.NAME --help`).

They are not in the wheel: they need torch, a profiler or write into the source tree. They import
from `pjllm` (its bench options, datasets and reports, the kernels' public functions); nothing in
`pjllm` imports from here.

    compare_hf       pjllm against HF transformers' continuous batching (the torch peer), same workload
    hf_backend       the torch peer itself (needs torch; imports nothing of pjllm, so no jax)
    tune_kernels     sweeps the Pallas attention tiles and writes the kernel's tuning table
    profile_kernels  `pjllm bench kernels` with device time per call from the JAX profiler
    device_profile   GPU kernel time by kind from a JAX or torch profiler trace
    profile_steps    where an engine step's device time goes (JAX profiler)
    gemm_rates       the step's matmuls at several token counts
    schedule_model   how fast a workload could run, on a cost model of a step

This file imports nothing, so that `benchmarks.hf_backend` loads without pjllm or jax.
"""
