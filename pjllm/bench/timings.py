"""Splitting engine construction into weight loading, compilation and the rest.

`LLMEngine.startup_timings` holds the seconds the engine spent in `load_weights_s` (building or
reading the weights onto the device) and `compile_s` (warmup: compiling every step program; absent
when warmup is off), of which `lower_s` was tracing and lowering. The bench times the whole `LLM(...)` call around it; `rest_s` is the remainder
(config, tokenizer, KV cache allocation).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class StartupTimings:
    """Seconds of one engine construction."""

    total_s: float
    weights_s: float | None = None
    compile_s: float | None = None
    lower_s: float | None = None
    rest_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def split_startup(engine: Any, total_s: float) -> StartupTimings:
    """`total_s` (the measured `LLM(...)` time) split by the engine's own `startup_timings`."""
    own = getattr(engine, "startup_timings", None) or {}
    weights = own.get("load_weights_s")
    if weights is None:
        return StartupTimings(total_s)
    compile_s = own.get("compile_s", 0.0)
    return StartupTimings(total_s, weights, compile_s, own.get("lower_s"),
                          max(total_s - weights - compile_s, 0.0))
