"""Where the engine step loop's host time goes: `pjllm bench throughput` with a timer on each part.

    python -m benchmarks.step_loop_host_time --model benchmarks/configs/llama-3-8b.json \\
        --load-format dummy --dataset chat --max-model-len 8192

Takes `pjllm bench throughput`'s options. Wraps the loop's parts (scheduling, preparing the
step's inputs, dispatching its programs, waiting for and recording its outputs, the engine's
processing of them) with wall-clock timers, and prints each part's total and mean per call
after the run, warm-up pass included. Parts nest: `LLMEngine._dispatch` holds `prepare` and
`dispatch`; `ModelRunner.fetch` is mostly waiting for the device.
"""

from __future__ import annotations

import collections
import functools
import sys
import time

from pjllm.engine.engine import LLMEngine
from pjllm.engine.scheduler import Scheduler
from pjllm.entrypoints import cli
from pjllm.runner.model_runner import ModelRunner

PARTS = [(LLMEngine, "step_requests"), (Scheduler, "schedule"), (LLMEngine, "_dispatch"),
         (ModelRunner, "prepare"), (ModelRunner, "dispatch"), (ModelRunner, "fetch"),
         (LLMEngine, "_process")]


def time_parts() -> tuple[collections.Counter, collections.Counter]:
    """Wraps each of PARTS with a timer; returns (seconds, calls) by part name, filled as they run."""
    seconds, calls = collections.Counter(), collections.Counter()
    for owner, name in PARTS:
        method, label = getattr(owner, name), f"{owner.__name__}.{name}"

        @functools.wraps(method)
        def timed(*args, _method=method, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                seconds[_label] += time.perf_counter() - start
                calls[_label] += 1
        setattr(owner, name, timed)
    return seconds, calls


def main() -> int:
    seconds, calls = time_parts()
    status = cli.main(["bench", "throughput", *sys.argv[1:]])
    print(f"{'part':28s} {'total s':>9s} {'calls':>7s} {'ms/call':>8s}")
    for label, total in seconds.most_common():
        print(f"{label:28s} {total:9.3f} {calls[label]:7d} {1e3 * total / calls[label]:8.3f}")
    return status


if __name__ == "__main__":
    sys.exit(main())
