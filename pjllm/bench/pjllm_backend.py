"""The pjllm side of a benchmark: an `LLM` behind the small interface of `backends.Backend`."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Sequence

from pjllm.bench.backends import WorkloadSize
from pjllm.bench.datasets import BenchRequest
from pjllm.bench.options import build_llm, engine_settings, replicas
from pjllm.bench.report import jax_device_info
from pjllm.bench.timings import split_startup


class PjllmBackend:
    """`generate(requests)` runs requests to completion and returns each one's output length.

    Sampling is at `temperature` (1.0 by default, as `vllm bench`), plain: no top-k/top-p, so the
    step program is the default variant that the engine's warmup compiles; EOS is ignored.
    """

    name = "pjllm"

    def __init__(self, args: argparse.Namespace, model: str, max_model_len: int, temperature: float = 1.0):
        self.llm, construct_s = build_llm(args, model, max_model_len)
        self.engines = replicas(self.llm)
        # Replicas are built one after another; the first one's split stands for each.
        self.timings = split_startup(self.engines[0], construct_s)
        # Without the engine's split, everything counts as loading.
        self.load_s = construct_s - (self.timings.compile_s or 0.0)
        self.warmup_s = self.timings.compile_s
        self.temperature = temperature
        self.seed = args.seed
        self._requests_seen = 0

    def generate(self, requests: Sequence[BenchRequest]) -> list[int]:
        from pjllm.sampling_params import SamplingParams

        params = []
        for request in requests:
            params.append(SamplingParams(temperature=self.temperature, max_tokens=request.output_len,
                                         ignore_eos=True, seed=self.seed + self._requests_seen))
            self._requests_seen += 1
        prompts = [{"prompt_token_ids": request.prompt_token_ids} for request in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [len(output.outputs[0].token_ids) for output in outputs]

    def step_timings(self) -> dict[str, float]:
        """The step loops' counts and seconds, summed over replicas (which step concurrently)."""
        totals: dict[str, float] = {}
        for engine in self.engines:
            for name, value in dataclasses.asdict(engine.step_timings).items():
                totals[name] = totals.get(name, 0) + value
        return totals

    def preemptions(self) -> int:
        return sum(engine.scheduler.num_preemptions for engine in self.engines)

    def settings_record(self) -> dict[str, Any]:
        return {**engine_settings(self.llm), "temperature": self.temperature}

    def device_info(self) -> dict[str, Any]:
        return jax_device_info()

    def close(self) -> None:
        self.llm.shutdown()


def open_pjllm_backend(args: argparse.Namespace, model: str, hf_config: dict[str, Any],
                       size: WorkloadSize, temperature: float) -> PjllmBackend:
    """The `backends.OpenBackend` of pjllm: an engine from the bench options, its max_model_len
    the workload's longest request (unless --max-model-len says)."""
    return PjllmBackend(args, model, size.max_total_len, temperature)
