"""How fast XLA's GEMMs run at the shapes of a pjllm step: each projection of a decoder layer
(fused QKV, O, fused gate/up, down) at several token counts M, compiled with the step's compiler
options (cuBLAS only), timed by GPU kernel time in a profiler trace and reported as TFLOP/s and
weight GB/s.

    python -m benchmarks.gemm_rates --config benchmarks/configs/llama-3-8b.json

This is the matmul rate behind the schedule model (benchmarks/schedule_model.py): the step's
time in prefill-heavy steps is these GEMMs at M = the step's padded token count.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from benchmarks.device_profile import device_times
from pjllm.runner.step import STEP_COMPILER_OPTIONS


def projection_shapes(hf_config: dict) -> dict[str, tuple[int, int]]:
    """(K, N) of each of a decoder layer's matmuls, with pjllm's fused QKV and gate/up."""
    hidden = hf_config["hidden_size"]
    head_dim = hf_config.get("head_dim") or hidden // hf_config["num_attention_heads"]
    q = hf_config["num_attention_heads"] * head_dim
    kv = hf_config.get("num_key_value_heads", hf_config["num_attention_heads"]) * head_dim
    intermediate = hf_config["intermediate_size"]
    return {"qkv": (hidden, q + 2 * kv), "o": (q, hidden), "gate_up": (hidden, 2 * intermediate),
            "down": (intermediate, hidden)}


def time_matmul(m: int, k: int, n: int, calls: int) -> float:
    """Seconds of GPU kernel time per [m, k] x [k, n] bf16 matmul, from a profiler trace of `calls`
    calls (dispatch gaps left out); wall time per call where there is no GPU (CPU checks)."""
    matmul = jax.jit(lambda x, w: x @ w, compiler_options=STEP_COMPILER_OPTIONS)
    x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16) / k ** 0.5
    matmul(x, w).block_until_ready()
    if jax.default_backend() == "gpu":
        return device_times(matmul, (x, w), calls=1, runs=calls)["device_ms"] / 1e3
    start = time.perf_counter()
    for _ in range(calls):
        matmul(x, w).block_until_ready()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="an HF config.json")
    parser.add_argument("--tokens", default="64,256,1024,2048,4096,8192", help="token counts M")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    with open(args.config) as f:
        shapes = projection_shapes(json.load(f))
    rows = []
    print(f"{'M':>6} {'matmul':>8} {'K x N':>13} {'ms':>8} {'TFLOP/s':>8} {'weight GB/s':>11}")
    for m in (int(t) for t in args.tokens.split(",")):
        layer_s = layer_flop = 0.0
        for name, (k, n) in shapes.items():
            seconds = time_matmul(m, k, n, args.calls)
            flop = 2.0 * m * k * n
            layer_s, layer_flop = layer_s + seconds, layer_flop + flop
            rows.append({"tokens": m, "matmul": name, "k": k, "n": n, "ms": seconds * 1e3,
                         "tflop_s": flop / seconds / 1e12, "weight_gb_s": 2.0 * k * n / seconds / 1e9})
            print(f"{m:6d} {name:>8} {f'{k}x{n}':>13} {seconds * 1e3:8.3f} {flop / seconds / 1e12:8.1f} "
                  f"{2.0 * k * n / seconds / 1e9:11.0f}")
        rows.append({"tokens": m, "matmul": "layer", "ms": layer_s * 1e3, "tflop_s": layer_flop / layer_s / 1e12})
        print(f"{m:6d} {'layer':>8} {'':>13} {layer_s * 1e3:8.3f} {layer_flop / layer_s / 1e12:8.1f}")
    if args.output_json:
        device = jax.devices()[0]
        with open(args.output_json, "w") as f:
            json.dump({"benchmark": "gemm_rates", "config": args.config, "device": device.device_kind,
                       "jax": jax.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "compiler_options": STEP_COMPILER_OPTIONS, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
