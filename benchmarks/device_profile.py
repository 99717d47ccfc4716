"""Where device time goes: GPU kernel time from a profiler trace, per kernel and per kind.

`jax.profiler.trace(folder)` and the torch profiler's `export_chrome_trace` both write a Chrome
`*.trace.json.gz`; `kernel_times` sums the duration of every GPU event by kernel name, and
`by_kind` groups the names into attention (pjllm's Pallas kernels, torch's flash / memory-efficient
SDPA), matmul (cuBLAS / CUTLASS / Triton GEMMs), copies and other (elementwise and reduction
kernels: norms, rope, residuals, sampling, KV writes, gathers).

`jax_trace` traces a block of JAX work into a folder; `device_times` profiles a jitted callable
and returns its GPU busy time per call (the kernels timing's `device_timer`, gemm_rates.py).
jax is imported only by those two, so the readers also serve torch traces where jax is absent.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import gzip
import json
import tempfile
from typing import Any, Callable, Iterator

KINDS = ("attention", "matmul", "copy", "other")
_ATTENTION_MARKS = ("paged", "attention", "flash", "fmha")
_MATMUL_MARKS = ("nvjet", "gemm", "cutlass", "cublas", "sm90_xmma", "triton_gemm")
# The torch profiler marks GPU work by category; JAX's trace puts it under "GPU" processes, on
# stream lines beside derived per-op / per-module lines.
_TORCH_GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
_DERIVED_LINES = ("XLA", "Launch", "Op", "Module", "Step")


@dataclasses.dataclass
class KernelTime:
    micros: float = 0.0
    calls: int = 0


def read_trace(trace_dir: str) -> list[dict]:
    """The events of the newest `*.trace.json.gz` under `trace_dir`."""
    paths = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        return json.load(f)["traceEvents"]


def gpu_events(events: list[dict]) -> list[dict]:
    """The complete ("X") events that ran on a GPU: the torch profiler's kernel and copy
    categories, or the GPU processes' stream lines of a JAX trace (not its derived op and module
    lines, which repeat the streams' work). [] when nothing ran on a GPU."""
    complete = [e for e in events if e.get("ph") == "X"]
    if any(e.get("cat") in _TORCH_GPU_CATEGORIES for e in complete):
        return [e for e in complete if e.get("cat") in _TORCH_GPU_CATEGORIES]
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    line_names = {(e["pid"], e["tid"]): str(e.get("args", {}).get("name", "")) for e in events
                  if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in gpu_pids}
    on_gpu = [e for e in complete if e.get("pid") in gpu_pids]
    if any("Stream" in name for name in line_names.values()):
        return [e for e in on_gpu if "Stream" in line_names.get((e["pid"], e.get("tid")), "")]
    return [e for e in on_gpu  # other naming: every GPU line but the derived ones
            if not any(w in line_names.get((e["pid"], e.get("tid")), "") for w in _DERIVED_LINES)]


def kernel_times(trace_dir: str) -> dict[str, KernelTime]:
    """{kernel name: total GPU time and calls} over the newest trace under `trace_dir`.
    On a CPU-only trace (no GPU events) every thread's events are summed instead."""
    events = read_trace(trace_dir)
    selected = gpu_events(events) or [e for e in events if e.get("ph") == "X"]
    times: dict[str, KernelTime] = collections.defaultdict(KernelTime)
    for event in selected:
        entry = times[event["name"]]
        entry.micros += event.get("dur", 0.0)
        entry.calls += 1
    return dict(times)


def kind_of(kernel_name: str) -> str:
    name = kernel_name.lower()
    if any(mark in name for mark in _ATTENTION_MARKS):
        return "attention"
    if any(mark in name for mark in _MATMUL_MARKS):
        return "matmul"
    if name.startswith(("memcpy", "memset")):
        return "copy"
    return "other"


def by_kind(times: dict[str, KernelTime]) -> dict[str, float]:
    """Seconds of GPU time per kind (KINDS), plus `total`."""
    seconds = dict.fromkeys(KINDS, 0.0)
    for name, entry in times.items():
        seconds[kind_of(name)] += entry.micros / 1e6
    seconds["total"] = sum(seconds[kind] for kind in KINDS)
    return seconds


def top_kernels(times: dict[str, KernelTime], count: int, per: int = 1) -> list[str]:
    """Report lines for the `count` kernels with the most time, in ms per `per` (e.g. steps)."""
    total = sum(entry.micros for entry in times.values()) or 1.0
    lines = [f"{'ms':>9} {'share':>6} {'calls':>8}  kernel"]
    for name, entry in sorted(times.items(), key=lambda item: -item[1].micros)[:count]:
        lines.append(f"{entry.micros / 1e3 / per:9.3f} {entry.micros / total:6.1%} "
                     f"{entry.calls / per:8.1f}  {name[:110]}")
    return lines


@contextlib.contextmanager
def jax_trace(folder: str) -> Iterator[None]:
    """Traces the JAX work done inside the block into `folder` (a `*.trace.json.gz` there)."""
    import jax

    with jax.profiler.trace(folder):
        yield
        jax.effects_barrier()


def device_times(run: Callable, args: tuple, calls: int, runs: int = 2) -> dict[str, Any]:
    """GPU busy time per call from a JAX profiler trace of `runs` executions of `run(*args)`, each
    of which makes `calls` calls:
    {"device_ms": sum of the durations of everything on the GPU streams / calls,
     "span_ms": GPU timeline from the first start to the last end / calls,
     "kernels_us": {kernel name: microseconds per call}}.
    Raises RuntimeError when nothing ran on a GPU."""
    import jax

    with tempfile.TemporaryDirectory() as log_dir:
        jax.profiler.start_trace(log_dir)
        try:
            for _ in range(runs):
                jax.block_until_ready(run(*args))
        finally:
            jax.profiler.stop_trace()
        events = read_trace(log_dir)
    gpu = gpu_events(events)
    if not gpu:
        processes = sorted({str(e.get("args", {}).get("name", "")) for e in events
                            if e.get("ph") == "M" and e.get("name") == "process_name"})
        raise RuntimeError(f"no GPU stream events in the trace; processes {processes[:8]}")
    kernels: dict[str, float] = {}
    for e in gpu:
        name = str(e.get("name", "?"))[:80]
        kernels[name] = kernels.get(name, 0.0) + float(e.get("dur", 0.0))
    first = min(float(e["ts"]) for e in gpu)
    last = max(float(e["ts"]) + float(e.get("dur", 0.0)) for e in gpu)
    total = runs * calls
    # span_ms: first start to last end on the GPU per call, idle gaps between kernels included
    # (the gaps between the profiled runs too, so an upper bound).
    return {"device_ms": sum(kernels.values()) / total / 1e3,
            "span_ms": (last - first) / total / 1e3,
            "kernels_us": {k: v / total for k, v in sorted(kernels.items(),
                                                           key=lambda kv: -kv[1])}}
