"""`pjllm bench`: benchmarks that print a table and write JSON (`--output-json`).

Each subcommand lives in its own module, `pjllm.bench.<name>`, which provides
`add_parser(subparsers)` (registers the subcommand called `<name>`) and `run(args) -> int`.
A module listed in SUBCOMMANDS that is not present (yet) is simply not offered.

    throughput  offline requests/s and tokens/s on a synthetic dataset
    latency     time to first token and time per output token at small batch sizes
    serve       an OpenAI-compatible server under load, from the client (`pjllm serve`, vLLM)
    startup     process start to first token, cold and warm compilation cache
    parity      greedy tokens of two attention backends through the whole engine
    kernels     attention kernels at fixed shapes (pjllm.bench.kernels)

These measure pjllm and need nothing beyond its own dependencies; `serve` measures any server
that speaks the OpenAI completions API, over HTTP. The comparison with HF
transformers (torch), the kernel tuner and the profilers are tools beside the package, in the
repository's benchmarks/ folder; they build on these modules.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

SUBCOMMANDS = ("throughput", "latency", "serve", "startup", "parity", "kernels")


def _module_name(name: str) -> str:
    return f"{__name__}.{name}"


def available_subcommands() -> list[str]:
    """The subcommands whose module exists."""
    return [name for name in SUBCOMMANDS if importlib.util.find_spec(_module_name(name)) is not None]


def add_bench_parser(subparsers) -> None:
    """Registers `pjllm bench <subcommand>` under the top-level `pjllm` subparsers."""
    parser = subparsers.add_parser("bench", help="benchmarks: " + ", ".join(available_subcommands()),
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_subparsers = parser.add_subparsers(dest="bench_command", required=True)
    for name in available_subcommands():
        importlib.import_module(_module_name(name)).add_parser(bench_subparsers)


def run_bench(args: argparse.Namespace) -> int:
    """Runs the chosen `pjllm bench` subcommand."""
    return int(importlib.import_module(_module_name(args.bench_command)).run(args) or 0)
