"""Probe on a GPU: does lax.cond block the dispatching thread, and what do sampler stages cost on
[N, V] float32 logits (V = Llama-3's 128,256)?  Prints one JSON line per measurement.

    python scripts/gpu_sampler_probe.py [cond] [stages] | filters [--no-sweeps]
"""

import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

V = 128256


def timed(fn, *args, reps=20):
    out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps * 1e3


def report(**kw):
    print(json.dumps(kw), flush=True)


def cond_probe():
    a = jnp.ones((8192, 8192), jnp.bfloat16) * 0.001

    def body(x, pred, with_cond):
        for _ in range(30):
            x = (x @ a).astype(jnp.bfloat16)
        logits = x[:256, :].astype(jnp.float32)
        logits = jnp.tile(logits, (1, 16))  # [256, 131072]
        if with_cond:
            return jax.lax.cond(pred, lambda l: jnp.sort(l, axis=-1)[:, :4],
                                lambda l: l[:, :4], logits)
        return logits[:, :4]

    for name, with_cond, options in (
            ("no cond", False, {}), ("cond", True, {}),
            ("cond, conditional command buffers", True,
             {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE"})):
        try:
            fn = jax.jit(lambda x, p: body(x, p, with_cond), compiler_options=options)
            x = jnp.ones((8192, 8192), jnp.bfloat16)
            for pred in (False, True):
                p = jnp.asarray(pred)
                jax.block_until_ready(fn(x, p))
                dispatch, total = [], []
                for _ in range(5):
                    start = time.perf_counter()
                    out = fn(x, p)
                    dispatch.append(time.perf_counter() - start)
                    jax.block_until_ready(out)
                    total.append(time.perf_counter() - start)
                report(probe="cond", case=name, pred=pred, dispatch_ms=1e3 * float(np.median(dispatch)),
                       total_ms=1e3 * float(np.median(total)))
        except Exception as error:  # noqa: BLE001
            report(probe="cond", case=name, error=repr(error)[:300])


def sortable(x):
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))


def bisect(x, bits):
    keys = sortable(x)
    target = jnp.full(x.shape[0], 50, jnp.int32)
    lo, hi = jnp.min(keys, -1), jnp.max(keys, -1)
    fan = 2 ** bits

    def body(_, bounds):
        lo, hi = bounds
        step = (hi - lo) // fan + ((hi - lo) % fan > 0)
        new_lo = lo
        for j in range(1, fan):
            cut = lo + step * j
            ok = (jnp.sum(keys >= cut[:, None], -1, dtype=jnp.int32) >= target) & (cut <= hi) & (cut >= lo)
            new_lo = jnp.where(ok, jnp.maximum(new_lo, cut), new_lo)
        return new_lo, jnp.minimum(hi, new_lo + step - 1)

    lo, hi = jax.lax.fori_loop(0, -(-32 // bits), body, (lo, hi))
    return lo


def top_k_chunks(x):
    v1, i1 = jax.lax.top_k(x, 16)
    rows = jnp.arange(x.shape[0])[:, None]
    v2, i2 = jax.lax.top_k(x.at[rows, i1].set(-jnp.inf), 4)
    return jnp.concatenate([v1, v2], -1)


def stage_probe():
    from pjllm.runner import sampler

    for n in (256, 1024):
        logits = jax.random.normal(jax.random.key(0), (n, V), jnp.float32) * 1.3
        cases = {
            "log_softmax+rank": lambda x: sampler.compute_logprobs(x, jnp.zeros(n, jnp.int32), 0).ranks,
            "sort": lambda x: jnp.sort(x, axis=-1, descending=True)[:, :4],
            "top_k 128": lambda x: jax.lax.top_k(x, 128)[0],
            "top_k 20": lambda x: jax.lax.top_k(x, 20)[0],
            "top_k 16": lambda x: jax.lax.top_k(x, 16)[0],
            "gumbel+argmax": lambda x: sampler.argmax_rows(
                x + sampler.gumbel_noise(sampler.row_keys(jnp.zeros(n, jnp.uint32), jnp.zeros(n, jnp.int32),
                                                          jnp.zeros(n, jnp.int32)), V)),
        }
        for bits in (1, 2, 4):
            cases[f"bisect count, {bits} bits/pass"] = lambda x, bits=bits: bisect(x, bits)
        cases["top_k 16 x2 chunks"] = top_k_chunks
        cases["cond(any) sort"] = lambda x: jax.lax.cond(
            jnp.any(x[:, 0] > 100), lambda y: jnp.sort(y, axis=-1)[:, :4], lambda y: y[:, :4], x)
        for name, fn in cases.items():
            try:
                report(probe="stage", n=n, case=name, ms=timed(jax.jit(fn), logits))
            except Exception as error:  # noqa: BLE001
                report(probe="stage", n=n, case=name, error=repr(error)[:300])


def filter_probe(sweeps: bool = True):
    """The sampler as it ships: its top-k/top-p methods, `largest_values` at a few block widths,
    the search at a few bits a pass, and whole sampler programs."""
    from pjllm.runner import sampler

    for n in (256, 1024):
        logits = jax.random.normal(jax.random.key(0), (n, V), jnp.float32) * 1.3
        rng = np.random.default_rng(0)
        top_k = jnp.asarray(rng.choice([0, 20, 50, 100], n), jnp.int32)
        top_p = jnp.asarray(rng.choice([1.0, 0.9, 0.95], n), jnp.float32)
        for block in (16, 32, 64) if sweeps else ():
            sampler.CANDIDATE_BLOCK = block
            for k in (20, 128):
                report(probe="largest_values", n=n, block=block, k=k,
                       ms=timed(jax.jit(lambda x, k=k: sampler.largest_values(x, k)), logits))
        sampler.CANDIDATE_BLOCK = 32
        for bits in (2, 3, 4) if sweeps else ():
            sampler.RADIX_BITS = bits
            for method in ("nucleus", "bisect"):
                report(probe="filter", n=n, method=method, bits=bits, ms=timed(jax.jit(
                    lambda x, m=method: sampler.apply_top_k_top_p(x, top_k, top_p, m)), logits))
        sampler.RADIX_BITS = 2
        for method in ("top_k_prefix", "sort"):
            report(probe="filter", n=n, method=method, ms=timed(jax.jit(
                lambda x, m=method: sampler.apply_top_k_top_p(x, top_k, top_p, m)), logits))
        metadata = sampler.SamplingMetadata(
            temperature=jnp.ones(n), top_k=top_k, top_p=top_p, min_p=jnp.zeros(n),
            presence_penalty=jnp.zeros(n), frequency_penalty=jnp.zeros(n),
            repetition_penalty=jnp.ones(n), seeds=jnp.arange(n, dtype=jnp.uint32),
            sample_index=jnp.zeros(n, jnp.int32), step=jnp.zeros(n, jnp.int32),
            prompt_lens=jnp.zeros(n, jnp.int32), banned_token_ids=jnp.full((n, 32), -1, jnp.int32),
            search_rows=jnp.full(sampler.few_searched_rows(n), n, jnp.int32))
        # The top_p-alone rows (a sixth of them, as in the mixed benchmark) for "nucleus_few".
        searched = np.flatnonzero((np.asarray(top_k) == 0) & (np.asarray(top_p) < 1))
        rows = np.full(sampler.few_searched_rows(n), n, np.int32)
        rows[:len(searched)] = searched[:len(rows)]
        few = dataclasses.replace(metadata, search_rows=jnp.asarray(rows))
        for method, filtered in (("sort", False), ("top_k_prefix", True), ("nucleus_few", True),
                                 ("nucleus", True), ("bisect", True)):
            for k in (0, 20):
                flags = sampler.SamplerFlags(filtered, method, False, k)
                md = few if method == "nucleus_few" else metadata
                report(probe="sample", n=n, method=method if filtered else "off", num_logprobs=k,
                       ms=timed(jax.jit(lambda x, f=flags, md=md: sampler.sample(x, md, f)), logits))


if __name__ == "__main__":
    if "filters" in sys.argv[1:]:
        report(devices=str(jax.devices()))
        filter_probe(sweeps="--no-sweeps" not in sys.argv)
        sys.exit()
    report(devices=str(jax.devices()))
    if "cond" in sys.argv[1:] or len(sys.argv) == 1:
        cond_probe()
    if "stages" in sys.argv[1:] or len(sys.argv) == 1:
        stage_probe()
