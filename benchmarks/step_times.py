"""Where a `pjllm bench throughput` run's time goes, step by step, beside the schedule model.

    python -m benchmarks.step_times --model benchmarks/configs/llama-3-8b.json --load-format dummy \\
        --dataset chat --max-model-len 8192 --matmul-tflops 706 --weight-tbps 2.6 \\
        --attention-tbps 4.0 --step-overhead-ms 1.1 [--trace-steps 400:440 --trace-dir DIR]

Takes `pjllm bench throughput`'s options and the cost model's rates (benchmarks/schedule_model.py).
For every step of the timed run it records the step's shape when scheduled (tokens, sequences,
KV tokens its decodes read) and when its outputs reached the host. Under async scheduling the
device runs a step as soon as the one before it is done, if the host has launched it by then, so
a step's *period* (from the previous step's outputs to its own) is its share of the run. Its
*wait* is how long the host waited for its outputs: near zero, the device was idle and the host
set the pace.

Prints the steps grouped by token bucket: how many, their periods' sum, the seconds the host
waited, how many steps the host set the pace of (waited < 0.2 ms), and the cost model's seconds
for the same steps. A bucket whose periods exceed the model by much is where to look next.
`--trace-steps A:B` traces steps A to B-1 of the timed run with the JAX profiler (a window of a
run too long for the profiler's buffer) and prints their kernels by kind.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from typing import Any, Iterator

import numpy as np

from benchmarks import device_profile
from benchmarks.schedule_model import add_cost_args, padded_tokens, step_costs, step_shape
from pjllm.bench import throughput
from pjllm.bench.report import write_json
from pjllm.engine.engine import LLMEngine
from pjllm.engine.scheduler import Scheduler
from pjllm.runner import step as runner_step
from pjllm.runner.model_runner import ModelRunner

HOST_PACED_WAIT_S = 2e-4


class StepRecorder:
    """Patches the scheduler, the runner's fetch and the engine step to record each step of the
    timed run (`recording()`): shapes [S, 3], outputs-on-host times and waits [S]."""

    def __init__(self, trace_steps: tuple[int, int] | None = None, trace_dir: str | None = None):
        self.shapes: list[tuple[int, int, int]] = []
        self.done: list[float] = []
        self.waits: list[float] = []
        self.start = 0.0
        self._on = False
        self._calls = 0
        self._trace_steps, self._trace_dir = trace_steps, trace_dir
        self._trace = contextlib.ExitStack()
        self._wrap(Scheduler, "schedule", after=self._after_schedule)
        self._wrap(ModelRunner, "fetch", after=self._after_fetch)
        self._wrap(LLMEngine, "step_requests", before=self._before_step)

    def _wrap(self, owner, name, before=None, after=None) -> None:
        """Replaces owner.name with a call that, while recording, runs `before()` first and
        `after(result, start)` afterwards (start: perf_counter before the call)."""
        method = getattr(owner, name)

        @functools.wraps(method)
        def wrapped(*args, **kwargs):
            if self._on and before is not None:
                before()
            start = time.perf_counter()
            result = method(*args, **kwargs)
            if self._on and after is not None:
                after(result, start)
            return result
        setattr(owner, name, wrapped)

    def _after_schedule(self, step, start: float) -> None:
        if step.scheduled:  # only a step with work is launched (and fetched)
            self.shapes.append(step_shape(step))

    def _after_fetch(self, result, start: float) -> None:
        self.done.append(time.perf_counter())
        self.waits.append(self.done[-1] - start)

    def _before_step(self) -> None:
        if self._trace_steps is None:
            return
        first, end = self._trace_steps
        if self._calls == first:
            self._trace.enter_context(device_profile.jax_trace(self._trace_dir))
        elif self._calls == end:
            self._trace.close()
        self._calls += 1

    @contextlib.contextmanager
    def recording(self, backend=None) -> Iterator[None]:
        """The timed run: a `throughput.measure` timed_run."""
        self.start, self._on = time.perf_counter(), True
        try:
            yield
        finally:
            self._on = False
            self._trace.close()


def bucket_table(shapes: np.ndarray, done: np.ndarray, waits: np.ndarray, start: float,
                 modelled: np.ndarray, max_num_batched_tokens: int) -> list[dict[str, Any]]:
    """Steps grouped by token bucket: count, period seconds, waited seconds, host-paced steps and
    the model's seconds. `shapes` [S, 3] (step_shape), `done` [S] outputs-on-host times from
    perf_counter, `waits` [S], `start` the run's start, `modelled` [S] model seconds."""
    periods = np.diff(np.concatenate([[start], done]))
    padded = padded_tokens(shapes, max_num_batched_tokens)
    rows = []
    for size in np.unique(padded):
        mask = padded == size
        rows.append({"bucket": int(size), "steps": int(mask.sum()), "period_s": periods[mask].sum(),
                     "wait_s": waits[mask].sum(),
                     "host_paced": int((waits[mask] < HOST_PACED_WAIT_S).sum()),
                     "model_s": modelled[mask].sum()})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_times", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    options = throughput.add_parser(subparsers)
    add_cost_args(options)
    options.add_argument("--trace-steps", default=None, help="A:B, steps of the timed run to trace")
    options.add_argument("--trace-dir", default="/tmp/pjllm-step-trace")
    options.add_argument("--triton-gemm-max-tokens", type=int, default=None,
                         help="A/B: Triton GEMMs in forwards of at most this many tokens "
                              f"(the engine's: {runner_step.TRITON_GEMM_MAX_TOKENS})")
    args = parser.parse_args(["throughput", *(sys.argv[1:] if argv is None else argv)])
    window = tuple(int(x) for x in args.trace_steps.split(":")) if args.trace_steps else None
    if args.triton_gemm_max_tokens is not None:
        runner_step.TRITON_GEMM_MAX_TOKENS = args.triton_gemm_max_tokens
    recorder = StepRecorder(window, args.trace_dir)
    record = throughput.measure(args, timed_run=recorder.recording)
    throughput.print_results([record])
    shapes = np.array(recorder.shapes, np.float64).reshape(-1, 3)[:len(recorder.done)]
    budget = record["settings"]["max_num_batched_tokens"]
    costs = step_costs(shapes, budget, args.matmul_tflops, args.weight_tbps, args.attention_tbps,
                       args.step_overhead_ms)
    done = np.array(recorder.done)
    rows = bucket_table(shapes, done, np.array(recorder.waits), recorder.start, costs["total"],
                        budget)
    print(f"{'bucket':>7s} {'steps':>6s} {'period s':>9s} {'waited s':>9s} {'host-paced':>10s} "
          f"{'model s':>8s} {'ms/step':>8s} {'model ms':>9s}")
    for row in rows:
        print(f"{row['bucket']:7d} {row['steps']:6d} {row['period_s']:9.2f} {row['wait_s']:9.2f} "
              f"{row['host_paced']:10d} {row['model_s']:8.2f} {1e3 * row['period_s'] / row['steps']:8.2f} "
              f"{1e3 * row['model_s'] / row['steps']:9.2f}")
    print(f"{'all':>7s} {len(shapes):6d} {sum(r['period_s'] for r in rows):9.2f} "
          f"{sum(r['wait_s'] for r in rows):9.2f} {sum(r['host_paced'] for r in rows):10d} "
          f"{sum(r['model_s'] for r in rows):8.2f}")
    write_json(args.output_json, {
        "benchmark": "step_times", "results": [record], "buckets": rows,
        "steps": {"shapes": shapes.tolist(), "done": (done - recorder.start).tolist(),
                  "waits": recorder.waits, "model_s": costs["total"].tolist()}})
    if window is not None:
        times = device_profile.kernel_times(args.trace_dir)
        busy = device_profile.by_kind(times)
        steps = window[1] - window[0]
        print(f"steps {window[0]}-{window[1] - 1}: GPU busy {busy['total'] * 1e3 / steps:.2f} ms per step: "
              + ", ".join(f"{kind} {busy[kind] * 1e3 / steps:.2f}" for kind in device_profile.KINDS))
        print("\n".join(device_profile.top_kernels(times, 30, per=steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
