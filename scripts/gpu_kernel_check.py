"""GPU check of the Pallas ragged paged attention kernel against the jnp reference.

For each case: max |pallas - reference| and median device time (block_until_ready per call) of
both, plus effective KV bandwidth of the kernel. With --sweep, also times alternative tiles.

    JAX_PLATFORMS=cuda python scripts/gpu_kernel_check.py [--sweep] [--reps 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pjllm.kernels import paged_attention as pallas_attention  # noqa: E402
from pjllm.kernels import reference  # noqa: E402
from pjllm.kernels.attention_metadata import AttentionMetadata  # noqa: E402
from pjllm.kernels.testing import random_ragged_layout  # noqa: E402

BlockConfig = pallas_attention.BlockConfig


def make_batch(seed: int, q_lens: list[int], ctx_lens: list[int], *, num_tokens: int,
               num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
               dtype) -> tuple[jax.Array, jax.Array, AttentionMetadata, int]:
    """Random q, KV pages and shuffled block tables; returns (q, kv_pages, metadata, ctx tokens)."""
    rng = np.random.default_rng(seed)
    max_pages = max(-(-c // page_size) for c in ctx_lens)
    total_pages = sum(-(-c // page_size) for c in ctx_lens) + 8
    md = random_ragged_layout(rng, q_lens, ctx_lens, page_size=page_size, num_tokens=num_tokens,
                              num_seqs=num_seqs, num_pages=total_pages, width=max_pages)
    # Timing reads only: no KV is written.
    md = jax.tree.map(jnp.asarray, dataclasses.replace(md, slot_mapping=np.full(num_tokens, -1, np.int32)))
    key = jax.random.key(seed)
    kq, kk = jax.random.split(key)
    q = jax.random.normal(kq, (num_tokens, num_q_heads, head_dim), jnp.float32).astype(dtype)
    kv = jax.random.normal(kk, (2, num_kv_heads, total_pages, page_size, head_dim),
                           jnp.float32).astype(dtype)
    return q, kv, md, int(sum(ctx_lens))


def median_time(fn, *args, reps: int, per_batch: int = 10) -> float:
    """Median per-call device time in ms: batches of back-to-back async calls, synchronized once
    per batch (so Python dispatch overlaps the device), median over reps // per_batch batches."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready([fn(*args) for _ in range(per_batch)])      # warm clocks and caches
    times = []
    for _ in range(max(3, reps // per_batch)):
        t0 = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(per_batch)])
        times.append((time.perf_counter() - t0) / per_batch)
    return 1e3 * statistics.median(times)


CASES = {
    # name: (q_lens, ctx_lens, T bucket, N bucket, Hq, Hkv, D, page, dtype)
    "llama3-8b decode B64 ctx2048": ([1] * 64, [2048] * 64, 64, 64, 32, 8, 128, 16, jnp.bfloat16),
    "llama3-8b decode B64 ctx~U(1,2048)": (
        [1] * 64, list(np.random.default_rng(1).integers(1, 2049, 64)), 64, 64, 32, 8, 128, 16,
        jnp.bfloat16),
    "llama3-8b decode B8 ctx4096": ([1] * 8, [4096] * 8, 8, 8, 32, 8, 128, 16, jnp.bfloat16),
    "llama3-8b decode B1 ctx4096": ([1], [4096], 1, 1, 32, 8, 128, 16, jnp.bfloat16),
    "llama3-8b prefill 512 @0": ([512], [512], 512, 8, 32, 8, 128, 16, jnp.bfloat16),
    "llama3-8b prefill 512 @1536": ([512], [2048], 512, 8, 32, 8, 128, 16, jnp.bfloat16),
    "llama3-8b mixed 256@512 + 63 decodes": (
        [256] + [1] * 63, [768] + [1024] * 63, 320, 64, 32, 8, 128, 16, jnp.bfloat16),
    "gqa7 f32 D64 page32 mixed": ([40, 1, 1, 17], [300, 90, 33, 17], 64, 8, 28, 4, 64, 32,
                                  jnp.float32),
    "mha D64 page8 fp16 decode": ([1] * 16, [500] * 16, 16, 16, 16, 16, 64, 8, jnp.float16),
}

# Alternative tiles timed with --sweep, per case name.
_DECODE_TILES = [BlockConfig(16, bk, w, st, kv_splits=None)
                 for bk, w, st in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3),
                                   (32, 4, 2))] + [BlockConfig(16, 64, 4, 2, kv_splits=2)]
_SPLITS = [BlockConfig(16, 64, 4, 2, kv_splits=s) for s in (1, 2, 4, 8, 16)]
_PREFILL_TILES = [BlockConfig(br, bk, w, st) for br, bk, w, st in (
    (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3),
    (128, 64, 8, 2), (64, 64, 8, 3))]
SWEEP = {
    "llama3-8b decode B64 ctx2048": _DECODE_TILES,
    "llama3-8b decode B8 ctx4096": _SPLITS,
    "llama3-8b decode B1 ctx4096": _SPLITS,
    "llama3-8b prefill 512 @0": _PREFILL_TILES,
    "llama3-8b prefill 512 @1536": _PREFILL_TILES,
    "llama3-8b mixed 256@512 + 63 decodes": _PREFILL_TILES + [BlockConfig(16, 64, 4, 2)],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--sweep", action="store_true", help="time alternative tiles too")
    parser.add_argument("--skip-reference-time", action="store_true")
    parser.add_argument("--budget", type=float, default=230.0, help="seconds before sweeps stop")
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    args = parser.parse_args()
    t_start = time.perf_counter()
    interpret = jax.default_backend() == "cpu"   # smoke-testing the script off GPU
    print("device:", jax.devices()[0].device_kind, "| jax", jax.__version__, flush=True)

    for name, (q_lens, ctx_lens, num_tokens, num_seqs, hq, hkv, d, ps, dtype) in CASES.items():
        if args.only not in name:
            continue
        try:
            q, kv, md, ctx_tokens = make_batch(
                0, q_lens, [int(c) for c in ctx_lens], num_tokens=num_tokens, num_seqs=num_seqs,
                num_q_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=ps, dtype=dtype)
            scale = d ** -0.5
            ref_fn = jax.jit(lambda q, kv, md: reference.paged_attention_reference(
                q, kv, md, sm_scale=scale))
            pal_fn = jax.jit(lambda q, kv, md, cfg=None: pallas_attention.paged_attention(
                q, kv, md, sm_scale=scale, config=cfg, interpret=interpret), static_argnums=3)
            want = np.asarray(ref_fn(q, kv, md).astype(jnp.float32))
            got = np.asarray(pal_fn(q, kv, md).astype(jnp.float32))
            err = float(np.max(np.abs(got - want)))
            finite = bool(np.isfinite(got).all())
            t_pal = median_time(pal_fn, q, kv, md, reps=args.reps)
            t_ref = (float("nan") if args.skip_reference_time
                     else median_time(ref_fn, q, kv, md, reps=30, per_batch=3))
            kv_bytes = 2 * ctx_tokens * hkv * d * jnp.dtype(dtype).itemsize
            cfg = pallas_attention.select_config(num_tokens, num_seqs, d)
            if cfg.kv_splits is None:
                bq = max(cfg.block_rows, 16) // pallas_attention._next_pow2(hq // hkv)
                cfg = dataclasses.replace(cfg, kv_splits=pallas_attention.num_kv_splits(
                    cfg, (num_tokens + num_seqs * (bq - 1)) // bq, hkv,
                    md.block_tables.shape[1] * ps))
            print(f"{name:40s} max_err={err:.2e} finite={finite} pallas={t_pal:.3f}ms "
                  f"ref={t_ref:.3f}ms kv_bytes/t={kv_bytes / t_pal / 1e6:.0f}GB/s cfg={cfg}",
                  flush=True)
            if args.sweep:
                for c in SWEEP.get(name, []):
                    if time.perf_counter() - t_start > args.budget:
                        print("    sweep stopped: time budget spent")
                        break
                    try:
                        out = np.asarray(pal_fn(q, kv, md, c).astype(jnp.float32))
                        e = float(np.max(np.abs(out - want)))
                        t = median_time(pal_fn, q, kv, md, c, reps=args.reps)
                        print(f"    sweep {c} err={e:.1e} {t:.3f}ms", flush=True)
                    except Exception as exc:  # noqa: BLE001
                        print(f"    sweep {c} FAILED: {type(exc).__name__}: {str(exc)[:200]}")
        except Exception:  # noqa: BLE001
            print(f"{name:40s} FAILED")
            traceback.print_exc(limit=3)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
