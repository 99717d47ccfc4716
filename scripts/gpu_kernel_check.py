"""GPU check of the Pallas paged attention kernels: correctness on ragged batches, and A/B timing.

1. Correctness: random ragged batches (decodes, prefill chunks at cached offsets, padding tokens
   and padding sequences, GQA 4 / 7 / 1, bf16 / fp16 / f32, page 8 / 16 / 32) through both kernels
   and several tile configs (KV splits, persistent grid), against the jnp reference: relative
   error ||out - ref|| / ||ref||, every output finite, padding rows exactly zero. The output buffer
   is poisoned first (a run on NaN queries of the same shape, so the allocator hands the same NaN
   memory to the checked run).
2. A/B timing on the Llama-3-8B shapes of `pjllm bench kernels` (same timing method): the kernel
   versions named by --versions, e.g. the previous kernel file given by --baseline, each with
   its default tiles, plus any --configs.

    python3 scripts/gpu_kernel_check.py [--baseline old_paged_attention.py]
        [--configs 'decode:16,64,4,3,2;...'] [--only decode]

--head-dims [D,D,...] replaces both with a check of every head_dim a model may have (64, 80, 96,
112, 128, 256 by default; the kernels pad the others to a power of 2 inside): decode, split-KV
decode, prefill and mixed batches in bf16 and float32 against the float32 reference (max abs and
relative error; float32 should be ~1e-6, TF32 dots would give ~1e-3), then decode timing at
B64 / ctx 2048 / Hq 32 / Hkv 8 for head_dim 128 and 80 in TB/s of KV read. It prints a table last
and writes head_dims.json into --out-dir. --tiny runs small shapes (in interpret mode off GPU).

    python3 scripts/gpu_kernel_check.py --head-dims --out-dir results/ [--tiny]

Only jax and numpy are needed: pjllm is imported from this checkout.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import os
import sys
import time
import traceback
import types
import warnings

# pjllm's kernels and bench helpers from this checkout, without pjllm/__init__.py: it loads the
# engine and its dependencies (flax, transformers), and the GPU machine may have only jax + numpy.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for benchmarks/
sys.modules["pjllm"] = types.ModuleType("pjllm")
sys.modules["pjllm"].__path__ = [os.path.join(ROOT, "pjllm")]
warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.device_profile import device_times  # noqa: E402
from pjllm.bench import kernels as bench  # noqa: E402
from pjllm.bench import report  # noqa: E402
from pjllm.kernels import paged_attention as pallas_attention  # noqa: E402
from pjllm.kernels import reference  # noqa: E402

BlockConfig = pallas_attention.BlockConfig
INTERPRET = jax.default_backend() == "cpu"      # smoke-testing this script off GPU

# name: (q_lens, ctx_lens, T bucket, N bucket, Hq, Hkv, D, page, dtype)
CHECKS = {
    "decode B64 ctx U(1,2048) bf16": (
        [1] * 64, list(np.random.default_rng(1).integers(1, 2049, 64)), 64, 64, 32, 8, 128, 16,
        jnp.bfloat16),
    "decode 5 of 8 + 11 pad tokens": ([1] * 5, [700, 1, 33, 16, 17], 16, 8, 32, 8, 128, 16,
                                      jnp.bfloat16),
    "small bucket mixed 9+1+1": ([9, 1, 1], [300, 90, 33], 16, 8, 32, 8, 128, 16, jnp.bfloat16),
    "prefill 512 @1536 + pad seqs": ([512], [2048], 512, 8, 32, 8, 128, 16, jnp.bfloat16),
    "mixed 256@512 + 63 decodes": ([256] + [1] * 63, [768] + [1024] * 63, 320, 64, 32, 8, 128,
                                   16, jnp.bfloat16),
    "gqa7 f32 D64 page32 mixed + pad": ([40, 1, 1, 17], [300, 90, 33, 17], 64, 8, 28, 4, 64, 32,
                                        jnp.float32),
    "mha fp16 D64 page8 decode": ([1] * 16, [500] * 16, 16, 16, 16, 16, 64, 8, jnp.float16),
}
CHECK_CONFIGS = [None, BlockConfig(16, 128, 8, 3, kv_splits=4, programs_per_sm=2),
                 BlockConfig(128, 32, 8, 2, kv_splits=2)]
TOL = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3, jnp.float32: 1e-5}   # f32 dots are IEEE, not TF32


def check_correctness(only: str) -> bool:
    ok_all = True
    print("== correctness vs reference (rel err = ||out-ref||/||ref||) ==", flush=True)
    for name, (q_lens, ctx_lens, t, n, hq, hkv, d, ps, dtype) in CHECKS.items():
        if only and only not in name:
            continue
        case = bench.Case(name, "check", tuple(q_lens), tuple(int(c) for c in ctx_lens), t, n,
                          hq, hkv, d, ps, jnp.dtype(dtype).name)
        inputs = bench.make_inputs(case, seed=7, on_gpu=False)     # one KV set is enough here
        q, kv, md, scale = inputs.qs[0], inputs.kvs[0], inputs.metadata, inputs.sm_scale
        want = bench.reference_output(inputs)
        real = int(sum(q_lens))
        for cfg in CHECK_CONFIGS:
            fn = jax.jit(lambda q, kv, cfg=cfg: pallas_attention.paged_attention(
                q, kv, md, sm_scale=scale, config=cfg, interpret=INTERPRET))
            try:
                poison = fn(jnp.full_like(q, jnp.nan), kv)
                del poison
                got = np.asarray(fn(q, kv).astype(jnp.float32))
                finite = bool(np.isfinite(got).all())
                rel = float(np.linalg.norm(got[:real] - want[:real]) / np.linalg.norm(want[:real]))
                pad_zero = bool((got[real:] == 0).all())
                ok = finite and pad_zero and rel <= TOL[dtype]
                print(f"  {'ok ' if ok else 'BAD'} {name:34s} {pallas_attention.kernel_mode(t, n):7s}"
                      f" rel {rel:.1e} finite {finite} pad0 {pad_zero} cfg {_short(cfg)}",
                      flush=True)
            except Exception as exc:  # noqa: BLE001
                ok = False
                print(f"  BAD {name:34s} {_short(cfg)} {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:300]}", flush=True)
            ok_all &= ok
    return ok_all


def _short(cfg) -> str:
    if cfg is None:
        return "table"
    return (f"r{cfg.block_rows}/kv{cfg.block_kv}/w{cfg.num_warps}/s{cfg.num_stages}"
            f"/x{cfg.kv_splits}" + (f"/p{cfg.programs_per_sm}" if cfg.programs_per_sm else ""))


def load_version(path: str):
    spec = importlib.util.spec_from_file_location("kernel_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def parse_configs(text: str) -> list[tuple[str, BlockConfig]]:
    """'decode:16,64,4,3,2[,1];prefill:64,64,4,2,1' -> [(kind, BlockConfig)]; split 0 = auto."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        kind, nums = part.split(":")
        v = [int(x) for x in nums.split(",")]
        out.append((kind, BlockConfig(v[0], v[1], v[2], v[3], kv_splits=v[4] or None,
                                      programs_per_sm=v[5] if len(v) > 5 else 0)))
    return out


def ab_timing(versions: dict, configs, only: str, budget: float, profile: bool,
              same_config: bool = False) -> list[dict]:
    rows = []
    start = time.perf_counter()
    wanted = [w for w in only.split(",") if w]
    for case in bench.FULL_CASES:
        if wanted and not any(w in case.name for w in wanted):
            continue
        inputs = bench.make_inputs(case, seed=0, on_gpu=True)
        want = bench.reference_output(inputs)
        same = None
        if same_config:       # every version on the current table's tiles for this shape
            same = pallas_attention.select_config(
                case.num_tokens, case.num_seqs, case.head_dim, num_q_heads=case.num_q_heads,
                num_kv_heads=case.num_kv_heads, page_size=case.page_size,
                max_context=case.max_pages * case.page_size)
        variants = [(vname, mod, same) for vname, mod in versions.items()]
        variants += [("current", pallas_attention, cfg) for kind, cfg in configs
                     if kind == case.kind]
        for vname, mod, cfg in variants:
            if time.perf_counter() - start > budget:
                print("  (A/B budget spent)")
                return rows
            md, scale = inputs.metadata, inputs.sm_scale
            kw = {"config": cfg} if cfg is not None else {}
            fn = (lambda q, kv, mod=mod, kw=kw:
                  mod.paged_attention(q, kv, md, sm_scale=scale, **kw))
            try:
                timing = bench.time_calls(fn, inputs.qs[0], inputs.kvs, reps=20, min_reps=5,
                                          seconds=0.4, device_timer=device_times if profile else None)
                out = np.asarray(timing.pop("first_out").astype(jnp.float32))
                rel = float(np.linalg.norm(out - want) / np.linalg.norm(want))
                row = {"case": case.name, "version": vname, "cfg": _short(cfg),
                       **timing, **case.rates(timing["time_ms"]), "rel_err": rel}
            except Exception as exc:  # noqa: BLE001
                row = {"case": case.name, "version": vname, "cfg": _short(cfg),
                       "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            rows.append(row)
            print("  " + (f"{row['case']:22s} {vname:9s} {row['cfg']:22s} {row['time_ms']:.4f} ms "
                          f"(iqr {row['spread_ms'] or 0:.4f}) {row['kv_gbps']:7.0f} GB/s "
                          f"{row['tflops']:6.1f} TFLOP/s rel {row['rel_err']:.1e}"
                          + (f" dev {row['device_ms']:.4f} ms span {row['span_ms']:.4f}"
                             if "device_ms" in row else "")
                          if "error" not in row else f"{row['case']:22s} {vname} FAILED "
                          f"{row['error']}"), flush=True)
    return rows


# ----------------------------------------------------------------------------- --head-dims

HEAD_DIMS = "80,96,112,256,128,64"          # padded ones first, in case the budget runs out
# kind: (q_lens, ctx_lens, T bucket, N bucket, Hq, Hkv), full size and --tiny. Split-KV decode:
# few sequences with long contexts, so that the table's kv_splits=None picks several splits.
HEAD_DIM_BATCHES = {
    "decode": ([1] * 64, list(np.random.default_rng(1).integers(1, 2049, 64)), 64, 64, 32, 8),
    "decode split-KV": ([1] * 3, [4096, 1500, 33], 4, 4, 32, 8),
    "prefill": ([384, 100], [1024, 100], 512, 8, 32, 8),
    "mixed GQA7": ([200] + [1] * 31, [400] + [700] * 31, 256, 32, 28, 4),
}
TINY_HEAD_DIM_BATCHES = {
    "decode": ([1] * 3, [40, 1, 17], 4, 4, 8, 2),
    "decode split-KV": ([1] * 2, [600, 33], 2, 2, 8, 2),
    "prefill": ([24, 9], [40, 9], 48, 4, 8, 2),
    "mixed GQA7": ([20, 1, 1], [20, 70, 33], 32, 4, 7, 1),
}
HEAD_DIM_DTYPES = ("bfloat16", "float32")


@functools.partial(jax.jit, static_argnames="sm_scale")
def _reference_f32(q, kv, md, *, sm_scale):
    """The jnp reference on float32 inputs, its dots at full float32 precision (XLA would run
    them as TF32 on the GPU by default, hiding the kernel's own error)."""
    with jax.default_matmul_precision("highest"):
        return reference.paged_attention_reference(q, kv, md, sm_scale=sm_scale)


def check_head_dims(head_dims: list[int], tiny: bool, deadline: float) -> list[dict]:
    """Both kernels (tiles from the table, as the engine runs them) at each head_dim and dtype
    against _reference_f32; a row per case."""
    batches = TINY_HEAD_DIM_BATCHES if tiny else HEAD_DIM_BATCHES
    rows = []
    print("== head_dim check vs float32 reference ==", flush=True)
    for d in head_dims:
        for dtype in HEAD_DIM_DTYPES:
            for kind, (q_lens, ctx_lens, t, n, hq, hkv) in batches.items():
                row = {"head_dim": d, "dtype": dtype, "kind": kind,
                       "kernel": pallas_attention.kernel_mode(t, n), "num_q_heads": hq,
                       "num_kv_heads": hkv, "num_tokens": t, "num_seqs": n}
                rows.append(row)
                if time.perf_counter() > deadline:
                    row["skipped"] = "budget spent"
                    continue
                case = bench.Case(f"{kind} D{d} {dtype}", kind, tuple(q_lens),
                                  tuple(int(c) for c in ctx_lens), t, n, hq, hkv, d, 16, dtype)
                row["kv_splits"] = bench.launch_config(case).kv_splits
                try:
                    row.update(_check_one(case))
                except Exception as exc:  # noqa: BLE001 - one failing shape must not stop the rest
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                row["ok"] = "error" not in row and row["finite"] and row["pad_zero"] and (
                    row["rel_err"] <= TOL[jnp.dtype(dtype).type])
                print(f"  {'ok ' if row['ok'] else 'BAD'} D{d:<4d} {dtype:9s} {kind:16s} "
                      + (f"rel {row['rel_err']:.1e} max_abs {row['max_abs_err']:.1e} "
                         f"splits {row['kv_splits']}" if "error" not in row else row["error"]),
                      flush=True)
    return rows


def _check_one(case) -> dict:
    inputs = bench.make_inputs(case, seed=7, on_gpu=False)        # one KV set is enough here
    q, kv, md, scale = inputs.qs[0], inputs.kvs[0], inputs.metadata, inputs.sm_scale
    want = np.asarray(_reference_f32(q.astype(jnp.float32), kv.astype(jnp.float32), md,
                                     sm_scale=scale))       # one compile for both dtypes
    run = functools.partial(pallas_attention.paged_attention, sm_scale=scale,
                            interpret=INTERPRET)
    jax.block_until_ready(run(jnp.full_like(q, jnp.nan), kv, md))   # NaN in the memory reused
    got = np.asarray(run(q, kv, md).astype(jnp.float32))
    real = int(sum(case.q_lens))
    return {"finite": bool(np.isfinite(got).all()), "pad_zero": bool((got[real:] == 0).all()),
            **bench.output_errors(got[:real], want[:real])}


def time_head_dims(head_dims: list[int], tiny: bool) -> list[dict]:
    """Decode at B64 / ctx 2048 / Hq 32 / Hkv 8 / bf16 (--tiny: B4 / ctx 64 / 8 / 2): each head_dim
    with its own tiles (what the engine runs), and the padded ones also with head_dim 128's tiles,
    so that the cost of the padding is told apart from the tiles. TB/s counts the real KV bytes."""
    b, ctx, hq, hkv = (4, 64, 8, 2) if tiny else (64, 2048, 32, 8)
    opts = ({"target_ms": 0.0, "max_calls": 1, "unroll": 1} if INTERPRET
            else {"target_ms": 4.0, "max_calls": 256, "unroll": 8})
    base = bench.Case(f"decode B{b} ctx{ctx}", "decode", (1,) * b, (ctx,) * b, b, b, hq, hkv, 128)
    tiles_128 = bench.launch_config(base)
    rows = []
    print(f"== decode timing, {base.name} Hq {hq} Hkv {hkv} bf16 ==", flush=True)
    for d in head_dims:
        case = dataclasses.replace(base, head_dim=d)
        inputs = bench.make_inputs(case, seed=0, on_gpu=not INTERPRET)
        own = bench.launch_config(case)
        for tiles, cfg in [("own", own)] + ([("D128's", tiles_128)] if own != tiles_128 else []):
            fn = functools.partial(pallas_attention.paged_attention, metadata=inputs.metadata,
                                   sm_scale=inputs.sm_scale, interpret=INTERPRET, config=cfg)
            row = {"head_dim": d, "tiles": tiles, "cfg": _short(cfg), "kv_bytes": case.kv_bytes()}
            try:
                timing = bench.time_calls(lambda q, kv: fn(q, kv), inputs.qs[0], inputs.kvs,
                                          reps=20, min_reps=5, seconds=0.5, **opts)
                timing.pop("first_out")
                row.update(timing, kv_tbps=case.kv_bytes() / (timing["time_ms"] * 1e-3) / 1e12)
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            rows.append(row)
            print(f"  D{d:<4d} {tiles:6s} tiles {row['cfg']:20s} "
                  + (f"{row['time_ms']:.4f} ms {row['kv_tbps']:.2f} TB/s" if "error" not in row
                     else row["error"]), flush=True)
    # Padding cost: time against head_dim 128's time scaled by the bytes read (D / 128).
    t128 = next((r["time_ms"] for r in rows if r["head_dim"] == 128 and "time_ms" in r), None)
    for row in rows:
        if t128 and "time_ms" in row:
            row["vs_d128_bytes_scaled"] = row["time_ms"] / (t128 * row["head_dim"] / 128)
    return rows


def run_head_dims(args) -> bool:
    start = time.perf_counter()
    head_dims = [int(d) for d in args.head_dims.split(",")]
    payload = {"check": "head_dims", "env": report.environment(None, report.jax_device_info),
               "tiny": args.tiny, "interpret": INTERPRET,
               "tolerance_rel": {k.__name__: v for k, v in TOL.items()}}
    path = os.path.join(args.out_dir, "head_dims.json") if args.out_dir else None
    checks = check_head_dims(head_dims, args.tiny, deadline=start + args.budget)
    bad = sum(not r["ok"] for r in checks if "skipped" not in r)
    skipped = sum("skipped" in r for r in checks)
    payload.update(checks=checks, bad=bad, skipped=skipped)
    report.write_json(path, payload)                 # the checks survive a kill during timing
    timing = time_head_dims([d for d in (128, 80) if d in head_dims] or head_dims[:1], args.tiny)
    payload.update(decode_timing=timing, seconds=time.perf_counter() - start)
    report.write_json(path, payload)
    print_head_dim_tables(checks, timing, payload["env"],
                          list(TINY_HEAD_DIM_BATCHES if args.tiny else HEAD_DIM_BATCHES))
    print("correctness:", "all ok" if not bad and not skipped
          else f"{bad} BAD, {skipped} skipped of {len(checks)}")
    return not bad and not skipped


def print_head_dim_tables(checks: list[dict], timing: list[dict], env: dict,
                          kinds: list[str]) -> None:
    summary = {}
    for r in checks:                        # one line per (head_dim, dtype), a column per kind
        line = summary.setdefault((r["head_dim"], r["dtype"]),
                                  {"head_dim": r["head_dim"], "dtype": r["dtype"]})
        if "skipped" in r:
            line[r["kind"]] = "skipped"
            continue
        line[r["kind"]] = f"{r['rel_err']:.1e}" if "rel_err" in r else "error"
        line["ok"] = line.get("ok", True) and r["ok"]
        if "max_abs_err" in r:
            line["max_abs_err"] = max(line.get("max_abs_err", 0.0), r["max_abs_err"])
    report.print_table(
        f"relative error vs float32 reference ({env.get('device')}, jax {jax.__version__})",
        list(summary.values()),
        [("head_dim", "D", ""), ("dtype", "dtype", "")] + [(k, k, "") for k in kinds]
        + [("max_abs_err", "max abs", ".1e"), ("ok", "ok", "")])
    report.print_table("decode timing (TB/s of KV read; x = time / (D128 time * D/128))", timing,
                       [("head_dim", "D", ""), ("tiles", "tiles", ""), ("cfg", "cfg", ""),
                        ("time_ms", "ms", ".4f"), ("kv_tbps", "TB/s", ".2f"),
                        ("vs_d128_bytes_scaled", "x", ".2f"), ("error", "error", "")])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default=None, help="an older paged_attention.py to time too")
    parser.add_argument("--configs", default="", help="extra tiles for the current kernel")
    parser.add_argument("--only", default="", help="correctness cases whose name contains this")
    parser.add_argument("--ab-cases", default="",
                        help="comma-separated substrings of the bench case names to time")
    parser.add_argument("--profile", action="store_true", help="device times from the profiler")
    parser.add_argument("--same-config", action="store_true",
                        help="run every version with the current table's tiles for the shape")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the A/B part (default 120), or for the --head-dims "
                             "checks (default 100: the whole run then takes under 3 minutes)")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--head-dims", nargs="?", const=HEAD_DIMS, default=None,
                        help=f"check (and time) these head dims instead (default: {HEAD_DIMS})")
    parser.add_argument("--out-dir", default=None, help="--head-dims: write head_dims.json here")
    parser.add_argument("--tiny", action="store_true", help="--head-dims: small shapes")
    args = parser.parse_args()
    print("device:", jax.devices()[0].device_kind, "| jax", jax.__version__, flush=True)
    if args.head_dims:
        args.budget = 100.0 if args.budget is None else args.budget
        sys.exit(0 if run_head_dims(args) else 1)
    args.budget = 120.0 if args.budget is None else args.budget
    ok = True
    if not args.skip_correctness:
        try:
            ok = check_correctness(args.only)
        except Exception:  # noqa: BLE001
            traceback.print_exc(limit=3)
            ok = False
    versions = {}
    if args.baseline:
        versions["baseline"] = load_version(args.baseline)
    versions["current"] = pallas_attention
    print("== A/B timing (median of reps; chained calls, ~4 ms per rep) ==", flush=True)
    ab_timing(versions, parse_configs(args.configs), args.ab_cases, args.budget, args.profile,
              args.same_config)
    print("correctness:", "all ok" if ok else "FAILURES")


if __name__ == "__main__":
    main()
