r"""pjllm against HF transformers' continuous batching (the torch peer) on the same workload.

    python -m benchmarks.compare_hf throughput --model benchmarks/configs/llama-3-8b.json \
        --load-format dummy --dataset chat --output-json chat-both.json
    python -m benchmarks.compare_hf latency --model benchmarks/configs/llama-3-8b.json \
        --load-format dummy --batch-sizes 1,8 --hf-cb-config '{"use_cuda_graph": true}'
    python -m benchmarks.compare_hf startup --model benchmarks/configs/llama-3-8b.json --load-format dummy

Each subcommand takes the options of `pjllm bench <subcommand>` and measures with pjllm's own
code (pjllm.bench), the hf side being benchmarks/hf_backend.py behind the same backend interface
(a random-weight model from the same config, the same token ids, EOS ignored). Beyond those:

  --backend both         pjllm, then hf, each in a fresh process of this command (the default):
                         jax keeps the GPU memory it took until its process exits, so the two
                         cannot take turns in one process. The JSON holds both records and the
                         pjllm / hf ratios.
  --backend pjllm|hf     one side, in this process.
  --hf-attn-implementation, --hf-cb-config
                         the HF model and its continuous-batching manager.
  throughput --profile-dir DIR
                         traces the timed run into DIR/<backend> (the JAX profiler for pjllm, the
                         torch profiler for hf) and records its GPU time by kind (device_time_s).

startup starts every engine in fresh processes anyway: pjllm twice (cold and warm compilation
cache), hf once (it compiles nothing): import is torch and transformers, weights the random-weight
model built on the device, rest the continuous-batching manager's start (CUDA graph capture when
--hf-cb-config asks for it), then one token.

Run from the repository root. The hf side needs torch (pip install torch, or pjllm's [torch] extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from benchmarks import device_profile
from benchmarks.hf_backend import HFBackend, HFSettings
from pjllm.bench import latency, startup, throughput
from pjllm.bench.backends import Backend, WorkloadSize
from pjllm.bench.options import load_hf_config, resolve_model
from pjllm.bench.pjllm_backend import open_pjllm_backend
from pjllm.bench.report import environment, read_json, write_json

BACKENDS = ("pjllm", "hf", "both")
THROUGHPUT_RATIO_KEYS = ("requests_per_s", "total_tokens_per_s", "output_tokens_per_s")
LATENCY_RATIO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
_CHILD_REPLACED_OPTIONS = ("--backend", "--output-json")
# Run with `python -c` from the repository root: notes when the interpreter is up, then imports
# torch and transformers but nothing of pjllm or jax (benchmarks/__init__.py imports nothing).
_HF_STARTUP_BOOTSTRAP = ("import time; up = time.time(); import sys; "
                         "from benchmarks.hf_backend import startup_child_main; "
                         "startup_child_main(up, sys.argv[1], sys.argv[2])")


def add_comparison_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="both", choices=BACKENDS,
                        help="'both': pjllm then hf, each in its own process, and their ratio")
    parser.add_argument("--hf-attn-implementation", default=None,
                        help="attn_implementation for the HF model (default: transformers' choice; "
                             "continuous batching makes it paged)")
    parser.add_argument("--hf-cb-config", type=json.loads, default=None,
                        help="JSON object of extra transformers ContinuousBatchingConfig fields, "
                             "e.g. '{\"use_cuda_graph\": true, \"max_memory_percent\": 0.5}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="bench_command", required=True)
    throughput_parser = throughput.add_parser(subparsers)
    add_comparison_args(throughput_parser)
    throughput_parser.add_argument(
        "--profile-dir", default=None,
        help="trace the timed run into DIR/<backend> (pjllm: JAX profiler, hf: torch profiler) and "
             "report its GPU time by kind (attention, matmul, copy, other, idle)")
    add_comparison_args(latency.add_parser(subparsers))
    add_comparison_args(startup.add_parser(subparsers))
    return parser


def open_hf_backend(args: argparse.Namespace, model: str, hf_config: dict[str, Any],
                    size: WorkloadSize, temperature: float) -> HFBackend:
    """The `pjllm.bench.backends.OpenBackend` of the torch peer; the bench's batch limits map to
    its continuous-batching manager's."""
    settings = HFSettings(dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, temperature=temperature,
                          seed=args.seed, attn_implementation=args.hf_attn_implementation,
                          cb_overrides=args.hf_cb_config)
    return HFBackend(hf_config, settings, size.max_prompt_len, size.max_output_len, size.num_requests)


OPENERS = {"pjllm": open_pjllm_backend, "hf": open_hf_backend}


def require_torch() -> None:
    """Fails early, with the fix, where the hf side cannot run."""
    if importlib.util.find_spec("torch") is None:
        raise ValueError("the hf side needs torch: pip install torch (or pjllm's [torch] extra)")


# ----------------------------------------------------------------------------- both sides


def child_argv(argv: list[str], backend: str, output_json: str) -> list[str]:
    """`argv` with --backend and --output-json replaced."""
    out: list[str] = []
    skip_next = False
    for item in argv:
        if skip_next:
            skip_next = False
            continue
        if item in _CHILD_REPLACED_OPTIONS:
            skip_next = True
            continue
        if item.startswith(tuple(option + "=" for option in _CHILD_REPLACED_OPTIONS)):
            continue
        out.append(item)
    return [*out, "--backend", backend, "--output-json", output_json]


def run_sides_in_children(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs this same command once for pjllm and once for hf, each in its own process; returns
    their JSON payloads."""
    payloads = []
    with tempfile.TemporaryDirectory(prefix="pjllm-compare-") as folder:
        for backend in ("pjllm", "hf"):
            path = os.path.join(folder, f"{backend}.json")
            command = [sys.executable, "-m", "benchmarks.compare_hf", *child_argv(args.argv, backend, path)]
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


def _results(args: argparse.Namespace, measure_here) -> list[dict[str, Any]]:
    """The records of both sides (from child processes), or `measure_here()`'s of one."""
    if args.backend == "both":
        return [payload["results"][0] for payload in run_sides_in_children(args)]
    return [measure_here()]


# ----------------------------------------------------------------------------- subcommands


def compare_throughput(args: argparse.Namespace) -> dict[str, Any]:
    results = _results(args, lambda: measure_throughput(args))
    payload: dict[str, Any] = {"benchmark": "throughput", "results": results}
    throughput.print_results(results)
    if args.backend == "both":
        pjllm, hf = results
        if pjllm["workload_digest"] != hf["workload_digest"]:
            raise RuntimeError("pjllm and hf ran different workloads (digests differ)")
        ratio = ratios(pjllm, hf, THROUGHPUT_RATIO_KEYS)
        payload["ratios"] = {"pjllm_over_hf": ratio}
        print("pjllm / hf: " + ", ".join(f"{key} x{value:.2f}" for key, value in ratio.items()))
    return payload


def measure_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """One side's throughput record, with the GPU time of its timed run under --profile-dir."""
    if not args.profile_dir:
        return throughput.measure(args, OPENERS[args.backend])
    folder = os.path.join(args.profile_dir, args.backend)

    def traced(backend: Backend):
        # torch's profiler for hf (it knows its device), JAX's for pjllm.
        return backend.trace(folder) if args.backend == "hf" else device_profile.jax_trace(folder)

    record = throughput.measure(args, OPENERS[args.backend], traced)
    record["device_time_s"] = device_time(folder, record["elapsed_s"])
    return record


def device_time(folder: str, elapsed: float) -> dict[str, float]:
    """GPU kernel seconds of the traced run by kind, and the idle rest of its wall time."""
    times = device_profile.kernel_times(folder)
    seconds = device_profile.by_kind(times)
    print("\n".join(["device time of the timed run, top kernels:"]
                    + device_profile.top_kernels(times, 12)))
    return {**seconds, "idle": max(elapsed - seconds["total"], 0.0)}


def compare_latency(args: argparse.Namespace) -> dict[str, Any]:
    results = _results(args, lambda: latency.measure(args, OPENERS[args.backend]))
    payload: dict[str, Any] = {"benchmark": "latency", "results": results}
    latency.print_results(results)
    if args.backend == "both":
        pjllm, hf = results
        hf_rows = {row["batch_size"]: row for row in hf["rows"]}
        payload["ratios"] = {"pjllm_over_hf": [
            {"batch_size": row["batch_size"], **ratios(row, hf_rows[row["batch_size"]], LATENCY_RATIO_KEYS)}
            for row in pjllm["rows"] if row["batch_size"] in hf_rows]}
        for ratio in payload["ratios"]["pjllm_over_hf"]:
            print(f"pjllm / hf at batch {ratio['batch_size']}: "
                  + ", ".join(f"{key} x{value:.2f}" for key, value in ratio.items() if key != "batch_size"))
    return payload


def compare_startup(args: argparse.Namespace) -> dict[str, Any]:
    model = resolve_model(args)
    hf_config = load_hf_config(model)  # fail here, not in a child, on a bad path
    prompt = startup.one_prompt(hf_config, args.input_len)
    results = []
    with tempfile.TemporaryDirectory(prefix="pjllm-startup-") as folder:
        if args.backend != "hf":
            results.append(startup.pjllm_record(args, model, prompt, folder))
        if args.backend != "pjllm":
            results.append(hf_startup_record(args, model, hf_config, prompt, folder))
    startup.print_results(model, results)
    return {"benchmark": "startup", "results": results}


def hf_startup_record(args: argparse.Namespace, model: str, hf_config: dict[str, Any], prompt: list[int],
                      folder: str) -> dict[str, Any]:
    """The torch peer started once in a fresh process, to one token."""
    settings = {"dtype": args.dtype, "max_num_seqs": 1, "seed": args.seed,
                "attn_implementation": args.hf_attn_implementation, "cb_overrides": args.hf_cb_config}
    spec = {"hf_config": hf_config, "settings": settings, "prompt_token_ids": prompt}
    print("startup: hf ...", flush=True)
    launched, child = startup.run_child(_HF_STARTUP_BOOTSTRAP, spec, folder, "hf")
    return {"backend": "hf", "model": model, "load_format": "dummy", "input_len": args.input_len,
            "runs": [startup.table_row("hf", "none", launched, child)], "settings": child["settings"],
            "env": environment(None, lambda: child["device_info"])}


SUBCOMMANDS = {"throughput": compare_throughput, "latency": compare_latency, "startup": compare_startup}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # --backend both runs this command line again per side
    try:
        if args.backend != "pjllm":
            require_torch()
        payload = SUBCOMMANDS[args.bench_command](args)
    except ValueError as error:
        print(f"compare_hf: error: {error}", file=sys.stderr)
        return 2
    write_json(args.output_json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
