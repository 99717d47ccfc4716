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

    python scripts/gpu_kernel_check.py [--baseline old_paged_attention.py]
        [--configs 'decode:16,64,4,3,2;...'] [--only decode]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.device_profile import device_times  # noqa: E402
from pjllm.bench import kernels as bench  # noqa: E402
from pjllm.kernels import paged_attention as pallas_attention  # noqa: E402

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
TOL = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3, jnp.float32: 1e-4}   # f32 dots are tf32


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
    parser.add_argument("--budget", type=float, default=120.0, help="seconds for the A/B part")
    parser.add_argument("--skip-correctness", action="store_true")
    args = parser.parse_args()
    print("device:", jax.devices()[0].device_kind, "| jax", jax.__version__, flush=True)
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
