"""Sweeps the Pallas paged attention kernel's tiles on the shapes of `pjllm bench kernels` and
merges the winners into the kernel's tuning table (pjllm/kernels/paged_attention_tuning.json).

    python -m benchmarks.tune_kernels --cases decode --budget 300          # GPU: Llama-3-8B shapes
    python -m benchmarks.tune_kernels --small --table none                 # CPU: tiny shapes, print only

For each case: stage 0 times a few tile candidates (rows, keys per step, warps, stages); stage 1
tries KV split counts (and a persistent grid) around the best tile, for the decode tiles only.
A candidate counts only if its output matches the pure-jnp reference (the bench's tolerance).
Timing is the bench's (`pjllm.bench.kernels.time_calls`) with shorter measurements. Afterwards
`pjllm bench kernels` measures the cases with the new table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from typing import Any

import numpy as np

from pjllm.bench import kernels as bench
from pjllm.bench.report import write_json
from pjllm.kernels import paged_attention as pa


def tune_candidates(case: bench.Case, stage: int, best: pa.BlockConfig | None = None
                    ) -> list[pa.BlockConfig]:
    """Stage 0: tiles; stage 1: KV split counts (and a persistent grid) around the best tile."""
    if pa.kernel_mode(case.num_tokens, case.num_seqs) == "decode":
        if stage == 0:
            tiles = [(64, 4, 4), (128, 8, 3), (64, 4, 2), (128, 8, 4), (32, 4, 4)]
            return [pa.BlockConfig(16, bk, w, st, kv_splits=None) for bk, w, st in tiles]
        return ([dataclasses.replace(best, kv_splits=s) for s in (1, 2, 4, 8)]
                + [dataclasses.replace(best, kv_splits=None, programs_per_sm=2)])
    if stage == 0:
        tiles = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 3),
                 (64, 128, 4, 3)]
        return [pa.BlockConfig(br, bk, w, st, kv_splits=1) for br, bk, w, st in tiles]
    return []           # prefill: the split combine (f32 partials through XLA) costs more


def tune_case(case: bench.Case, args: argparse.Namespace, *, on_gpu: bool, min_reps: int,
              deadline: float, small: bool) -> dict[str, Any]:
    """Times the candidate configs of one case; returns {"best", "candidates", ...}."""
    import jax.numpy as jnp

    inputs = bench.make_inputs(case, seed=args.seed + 1, on_gpu=on_gpu)
    want = bench.reference_output(inputs)
    real = int(sum(case.q_lens))
    results: list[dict[str, Any]] = []
    best = None
    iters = None                 # loop length of the first candidate's timing, reused after
    for stage in (0, 1):
        cands = tune_candidates(case, stage, best["config_obj"] if best else None)
        if small:
            cands = cands[:2]
        for cfg in cands:
            if any(r["config_obj"] == cfg for r in results):
                continue
            if time.perf_counter() > deadline:
                break
            rec: dict[str, Any] = {"config_obj": cfg}
            try:
                fn = bench.pallas_fn(case, inputs, not on_gpu, cfg)
                timing = bench.time_calls(fn, inputs.qs[0], inputs.kvs, reps=max(min_reps, 10),
                                          min_reps=min_reps, seconds=0.3, iters=iters,
                                          **bench.timing_options(args, on_gpu))
                iters = timing["iters"]
                out = np.asarray(timing.pop("first_out").astype(jnp.float32))[:real]
                rec.update(bench.output_errors(out, want[:real]))
                rec.update(timing)
                rec["resolved"] = dataclasses.asdict(bench.launch_config(case, cfg))
                ok = rec["rel_err"] <= bench.tolerance(case)
                rec["ok"] = ok
                if ok and (best is None or rec["time_ms"] < best["time_ms"]):
                    best = rec
            except Exception as exc:  # noqa: BLE001 - a candidate that fails is just not chosen
                rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            results.append(rec)
            print(f"    tune {case.name:22s} {cfg} -> "
                  + (f"{rec['time_ms']:.4f} ms rel_err {rec['rel_err']:.1e}" if "time_ms" in rec
                     else rec.get("error", "?")), flush=True)
        if best is None:
            break
    clean = [{k: v for k, v in r.items() if k != "config_obj"}
             | {"config": dataclasses.asdict(r["config_obj"])} for r in results]
    return {"case": case.name, "candidates": clean,
            "best": dataclasses.asdict(best["config_obj"]) if best else None,
            "best_time_ms": best["time_ms"] if best else None}


def table_key(case: bench.Case) -> str:
    """The case's key in the kernel's tuning table."""
    return pa.shape_key(pa.kernel_mode(case.num_tokens, case.num_seqs), case.num_q_heads,
                        case.num_kv_heads, case.head_dim, case.page_size, case.num_tokens,
                        case.num_seqs, case.max_pages * case.page_size)


def write_tuning_table(path: str, entries: dict[str, dict], env: dict[str, Any]) -> None:
    """Merges {shape_key: config dict} into the JSON tuning table at `path`."""
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        table = {}
    table.setdefault("about", "Pallas paged attention tiles by shape, written by "
                              "benchmarks/tune_kernels.py; see pjllm/kernels/tile_configs.py:select_config")
    configs = table.setdefault("configs", {})
    for key, cfg in entries.items():
        configs[key] = dict(cfg, device=env.get("device"), date=env.get("date"))
    table["configs"] = dict(sorted(configs.items()))
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    pa.load_tuning_table.cache_clear()  # this process reads the new table from now on
    print(f"wrote {len(entries)} entries to {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_case_args(parser)
    bench.add_timing_args(parser)
    parser.add_argument("--budget", type=float, default=600.0,
                        help="seconds the whole sweep may take; it stops early past this")
    parser.add_argument("--table", default=None,
                        help="tuning table to merge the winners into (default: the kernel's own, "
                             f"{pa.TUNING_FILE}, except for small shapes; 'none': print only)")
    parser.add_argument("--output-json", default=None,
                        help="write every candidate's timing and the winners to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    import jax

    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    on_gpu = jax.default_backend() == "gpu"
    small = args.small or not on_gpu
    min_reps = args.min_reps or (5 if on_gpu else 1)
    cases = bench.select_cases(args.cases, small)
    if not cases:
        print("no case matches --cases", file=sys.stderr)
        return 2
    env = bench.device_env(None)
    print(f"device: {env.get('device')} | jax {jax.__version__} | tuning {len(cases)} cases", flush=True)
    start = time.perf_counter()
    # Each case may spend up to its share of the budget plus what earlier cases left over.
    tuned = [tune_case(case, args, on_gpu=on_gpu, min_reps=min_reps,
                       deadline=start + args.budget * (i + 1) / len(cases), small=small)
             for i, case in enumerate(cases)]
    entries = {table_key(case): t["best"] for case, t in zip(cases, tuned) if t["best"]}
    print("\nproposed tuning table (shape key -> BlockConfig):")
    print(json.dumps(entries, indent=1))
    path = args.table if args.table is not None else (None if small else pa.TUNING_FILE)
    if path and path.lower() != "none":
        write_tuning_table(path, entries, env)
    write_json(args.output_json, {"benchmark": "tune_kernels", "env": env, "small": small,
                                  "entries": entries, "cases": tuned, "written_to": path,
                                  "seconds": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    sys.exit(main())
