"""Opening a benchmark backend by name, and running `--backend both` as one child process each.

Both backends answer `generate(requests) -> output lengths`, `load_s`, `settings_record()`,
`device_info()` and `close()`. With `--backend both`, pjllm and then hf each run in a fresh
process (the same command with `--backend X`): jax keeps the GPU memory it took until its process
exits, so the two cannot take turns in one process.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from typing import Any

from pjllm.bench.report import read_json

_STRIPPED_OPTIONS = ("--backend", "--output-json")


def open_backend(name: str, args: argparse.Namespace, model: str, hf_config: dict[str, Any],
                 max_prompt_len: int, max_output_len: int, max_total_len: int, num_requests: int,
                 temperature: float):
    """Builds backend `name` ("pjllm" or "hf") sized for the given workload.

    `max_total_len` (longest prompt + output) is pjllm's `max_model_len` unless --max-model-len says.
    """
    if name == "pjllm":
        from pjllm.bench.pjllm_backend import PjllmBackend

        return PjllmBackend(args, model, max_total_len, temperature)
    if name == "hf":
        require_torch()
        from pjllm.bench.hf_backend import HFBackend, HFSettings

        settings = HFSettings(dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens, temperature=temperature,
                              seed=args.seed, attn_implementation=args.hf_attn_implementation,
                              cb_overrides=args.hf_cb_config)
        return HFBackend(hf_config, settings, max_prompt_len, max_output_len, num_requests)
    raise ValueError(f"backend must be 'pjllm' or 'hf'; got {name!r}")


def require_torch() -> None:
    """Fails early, with the fix, where the hf backend cannot run."""
    if importlib.util.find_spec("torch") is None:
        raise ValueError("--backend hf needs torch: pip install torch (or pjllm's [torch] extra)")


def child_argv(argv: list[str], backend: str, output_json: str) -> list[str]:
    """`argv` with --backend and --output-json replaced."""
    out: list[str] = []
    skip_next = False
    for item in argv:
        if skip_next:
            skip_next = False
            continue
        if item in _STRIPPED_OPTIONS:
            skip_next = True
            continue
        if item.startswith(tuple(option + "=" for option in _STRIPPED_OPTIONS)):
            continue
        out.append(item)
    return [*out, "--backend", backend, "--output-json", output_json]


def measure_backends(args: argparse.Namespace, measure) -> list[dict[str, Any]]:
    """One result record per backend: `measure(args, backend)` here, or, for `--backend both`,
    this same command run once per backend in child processes."""
    if args.backend == "both":
        return [payload["results"][0] for payload in run_backends_in_children(args)]
    return [measure(args, args.backend)]


def run_backends_in_children(args: argparse.Namespace, backends: tuple[str, ...] = ("pjllm", "hf")
                             ) -> list[dict[str, Any]]:
    """Runs this same command once per backend, each in its own process; returns their JSON payloads."""
    argv = getattr(args, "cli_argv", None)
    if argv is None:
        raise ValueError("--backend both needs the command line (args.cli_argv, set by pjllm's CLI)")
    if "hf" in backends:
        require_torch()
    payloads = []
    with tempfile.TemporaryDirectory(prefix="pjllm-bench-") as folder:
        for backend in backends:
            path = os.path.join(folder, f"{backend}.json")
            command = [sys.executable, "-m", "pjllm.entrypoints.cli", *child_argv(argv, backend, path)]
            print(f"\n### {backend}: {' '.join(command[1:])}", flush=True)
            completed = subprocess.run(command)
            if completed.returncode != 0:
                raise RuntimeError(f"the {backend} benchmark process exited with {completed.returncode}")
            payloads.append(read_json(path))
    return payloads


def ratios(numerator: dict[str, Any], denominator: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    """numerator[k] / denominator[k] for each key both have (non-zero)."""
    out = {}
    for key in keys:
        a, b = numerator.get(key), denominator.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            out[key] = a / b
    return out
