"""What the throughput and latency measurements drive: a backend that runs requests to completion.

`pjllm bench` opens pjllm's own (`pjllm_backend.open_pjllm_backend`). The measurement functions
take the opener as an argument, so a tool beside the package can drive another engine through
the same code: benchmarks/compare_hf.py passes HF transformers' continuous batching (the torch
peer, benchmarks/hf_backend.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Protocol, Sequence

from pjllm.bench.datasets import BenchRequest


@dataclasses.dataclass(frozen=True)
class WorkloadSize:
    """What a backend is sized for."""

    max_prompt_len: int
    max_output_len: int
    max_total_len: int     # longest prompt + output: pjllm's max_model_len unless --max-model-len says
    num_requests: int


class Backend(Protocol):
    name: str              # the record's "backend"
    load_s: float          # seconds to build the model (weights)

    def generate(self, requests: Sequence[BenchRequest]) -> list[int]:
        """Runs the requests to completion (EOS ignored); returns each one's output length."""

    def settings_record(self) -> dict[str, Any]:
        """The resolved settings a result should record."""

    def device_info(self) -> dict[str, Any]:
        """Device fields for the record's env block."""

    def close(self) -> None:
        """Releases the engine."""


# (the bench options, model path, its HF config, the workload's size, temperature) -> a backend
OpenBackend = Callable[[argparse.Namespace, str, dict[str, Any], WorkloadSize, float], Backend]
