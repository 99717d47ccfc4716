"""Cascade attention against plain paged attention, kernel level: batches whose sequences all
begin with the same prefix pages (a shared system prompt), Llama-3-8B attention shapes (32 query
heads, 8 kv heads, head_dim 128, bf16, page size 16).

    python -m benchmarks.cascade_attention --output-json cascade.json

For each case, `ops.paged_attention` with the Pallas backend twice: without the common-prefix
claim (every sequence reads the prefix itself) and with it (`common_prefix_len`: one pass over the
prefix for the whole batch, then each sequence's own part, merged). Time per call as `pjllm bench
kernels` times it; errors against the float32 jnp reference without the claim.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np


@dataclasses.dataclass(frozen=True)
class CascadeCase:
    name: str
    q_lens: tuple[int, ...]
    own_lens: tuple[int, ...]      # context past the prefix, query tokens included
    prefix_len: int
    num_tokens: int
    num_seqs: int


def _cases(prefix_len: int, small: bool, decode_batches: str) -> list[CascadeCase]:
    def decode(batch: int, own: int) -> CascadeCase:
        return CascadeCase(f"decode B{batch} prefix{prefix_len} + {own}", (1,) * batch,
                           (own,) * batch, prefix_len, batch, batch)

    if small:  # a smoke run (interpret mode off GPU)
        return [decode(4, 20)]
    if decode_batches:
        return [decode(int(batch), 200) for batch in decode_batches.split(",")]
    return [decode(64, 200), decode(256, 200), decode(256, 1000),
            CascadeCase(f"mixed 255x1 + 288 prefix{prefix_len} + 200", (1,) * 255 + (288,),
                        (200,) * 255 + (288,), prefix_len, 640, 256)]


def run_case(case: CascadeCase, timing: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from pjllm.bench.kernels import output_errors, time_calls
    from pjllm.kernels import ops, reference
    from pjllm.kernels.testing import random_ragged_layout

    page_size, heads, kv_heads, head_dim = 16, 32, 8, 128
    ctx_lens = [case.prefix_len + own for own in case.own_lens]
    width = -(-max(ctx_lens) // page_size)
    num_pages = sum(-(-own // page_size) for own in case.own_lens) + width + 8
    rng = np.random.default_rng(0)
    md = random_ragged_layout(rng, list(case.q_lens), ctx_lens, page_size=page_size,
                              num_tokens=case.num_tokens, num_seqs=case.num_seqs,
                              num_pages=num_pages, width=width,
                              shared_pages=case.prefix_len // page_size)
    plain = jax.tree.map(jnp.asarray, md)
    cascade = dataclasses.replace(plain, common_prefix_len=jnp.int32(case.prefix_len))
    key_q, key_kv = jax.random.split(jax.random.key(0))
    q = jax.random.normal(key_q, (case.num_tokens, heads, head_dim), jnp.float32)
    kv_shape = (2, kv_heads, num_pages, page_size, head_dim)
    # Enough copies of the pages that repeated calls do not find them in L2.
    kv_bytes = 2 * kv_heads * num_pages * page_size * head_dim * 2
    kvs = [jax.random.normal(k, kv_shape, jnp.float32).astype(jnp.bfloat16)
           for k in jax.random.split(key_kv, int(min(8, max(1, 256e6 // kv_bytes))))]
    q = q.astype(jnp.bfloat16)
    scale = head_dim ** -0.5
    want = np.asarray(jax.jit(lambda q, kv: reference.paged_attention_reference(
        q.astype(jnp.float32), kv.astype(jnp.float32), plain, sm_scale=scale))(q, kvs[0]))
    record = {"case": case.name, "num_tokens": case.num_tokens, "num_seqs": case.num_seqs,
              "prefix_len": case.prefix_len}
    for name, metadata in (("plain", plain), ("cascade", cascade)):
        def fn(q, kv, metadata=metadata):
            return ops.paged_attention(q, kv, metadata, sm_scale=scale, backend="pallas")

        result = time_calls(fn, q, kvs, **timing)
        record[f"{name}_ms"] = result["time_ms"]
        record[f"{name}_errors"] = output_errors(
            np.asarray(result["first_out"].astype(jnp.float32)), want)
    record["speedup"] = record["plain_ms"] / record["cascade_ms"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--small", action="store_true", help="one tiny case (CPU smoke run)")
    parser.add_argument("--decode-batches", default="",
                        help="only decodes of these batch sizes, 200 tokens past the prefix each")
    parser.add_argument("--output-json")
    args = parser.parse_args()
    import jax

    on_gpu = jax.default_backend() == "gpu"
    timing = (dict(reps=20, min_reps=5, seconds=2.0) if on_gpu
              else dict(reps=1, min_reps=1, seconds=0.0, target_ms=0.0, max_calls=1, unroll=1))
    records = []
    for case in _cases(args.prefix_len, args.small, args.decode_batches):
        record = run_case(case, timing)
        print(json.dumps(record), flush=True)
        records.append(record)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": str(jax.devices()[0].device_kind), "runs": records}, f, indent=1)


if __name__ == "__main__":
    main()
