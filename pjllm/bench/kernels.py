"""`pjllm bench kernels`: the attention kernels at fixed shapes, side by side with alternatives.

Cases (Llama-3-8B attention: Hq 32, Hkv 8, head_dim 128, page 16, bf16):
  decode  B64/ctx2048, B256/ctx1024, B32/ctx8192, B1/ctx4096 (one token per sequence, T = N = B);
          B64 at ctx4096 with a 1024-token sliding window, beside B64 at ctx1024 and ctx4096
          without one: a windowed decode that reads only its window takes ctx1024's time;
  prefill one chunk of 512 or 2048 tokens at offset 0 and at a cached offset (T = chunk, N = 8,
          seven padding sequences); and "N..." cases: one prompt of 512, 1024 or 2048 tokens,
          and a mixed step of 255 decodes and a 288-token chunk, as the engine pads them (N =
          min(T, max_num_seqs = 1024): up to 1024 tokens the Triton kernels take decode tiles).
Implementations on the same inputs (all but pallas built in pjllm/bench/kernel_baselines.py):
  pallas       pjllm.kernels.paged_attention (tiles from its tuning table)
  hopper       pjllm.kernels.hopper_prefill, the Mosaic GPU prefill kernel (the cases it supports:
               T whole 64-token tiles, decodes included for comparison; interpret mode on CPU)
  reference    pjllm.kernels.reference.paged_attention_reference (pure XLA: page gathers in a loop)
  jax_bundled  jax.experimental.pallas.ops.gpu.paged_attention (decode only; its defaults, K and V
               pages as two arrays and block tables padded to a power of 2 of pages, as it needs)
  cudnn        jax.nn.dot_product_attention(implementation="cudnn") on the equivalent dense causal
               shapes (prefill only; at a cached offset the bottom-right causal mask is a bias);
               on CPU it runs implementation="xla" instead.
  mosaic_dense jax's bundled Hopper flash attention in Mosaic GPU (attention_mgpu) on the same dense
               shapes (prefill at offset 0, GPU only): what Mosaic GPU reaches before paging.

Timing: one jitted executable runs a chain of calls (each output is the next call's q, so XLA can
neither merge nor reorder them) in a fori_loop, rotating through enough copies of the KV pages that
they do not sit in L2, with about --target-ms of device work per rep; each rep is synchronized
(block_until_ready) and time_ms is the median over reps of rep time / calls. Metadata preparation
that does not depend on q (the kernels' work lists) is hoisted out of the loop by XLA, as it is
shared by the layers of one engine step.
Metrics: time (ms), KV GB/s = K and V bytes of every sequence's context / time (each read once;
with a sliding window, only the keys inside some token's window count), TFLOP/s = 4 * head_dim *
Hq * (query, key) pairs inside the causal mask (and window) / time, and the error of
each output against the reference (max abs, and ||out - ref|| / ||ref||).

On CPU (or with --small) tiny shapes run in Pallas interpret mode, so that the command and its
JSON can be tested anywhere.

Tools beside the package build on this module: benchmarks/tune_kernels.py sweeps the Pallas
kernel's tiles and writes its tuning table; benchmarks/profile_kernels.py runs this benchmark with
device time per call from the JAX profiler (`run(args, device_timer=...)`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from pjllm.bench import kernel_baselines as baselines
from pjllm.bench.report import environment, format_table, jax_device_info, write_json

if TYPE_CHECKING:
    from pjllm.kernels.paged_attention import BlockConfig

IMPLS = ("pallas", "hopper", "reference", "jax_bundled", "cudnn", "mosaic_dense")
# (the timed executable, its arguments, calls per execution) -> extra record fields, such as the
# device time per call that benchmarks/device_profile.py reads from a profiler trace.
DeviceTimer = Callable[[Callable, tuple, int], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str                        # "decode" | "prefill" | "mixed"
    q_lens: tuple[int, ...]
    ctx_lens: tuple[int, ...]
    num_tokens: int                  # T bucket
    num_seqs: int                    # N bucket
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    dtype: str = "bfloat16"
    sliding_window: int | None = None

    @property
    def max_pages(self) -> int:
        return max(-(-c // self.page_size) for c in self.ctx_lens)

    @property
    def max_context(self) -> int:
        """The most keys one query reads, as the kernel sizes its tiles and splits."""
        width = self.max_pages * self.page_size
        return width if self.sliding_window is None else min(width, self.sliding_window)

    def _keys_seen(self, position: int) -> int:
        """Keys the query at `position` attends to: those up to it, inside its window if any."""
        return position + 1 if self.sliding_window is None else min(position + 1, self.sliding_window)

    def kv_bytes(self) -> int:
        """K and V bytes the sequences' queries need, each key once: from the first key inside
        the window of a sequence's first query to the end of its context."""
        itemsize = np.dtype(self.dtype).itemsize if self.dtype != "bfloat16" else 2
        keys = sum(q + self._keys_seen(c - q) - 1 for q, c in zip(self.q_lens, self.ctx_lens))
        return 2 * keys * self.num_kv_heads * self.head_dim * itemsize

    def flops(self) -> int:
        pairs = sum(sum(self._keys_seen(c - q + k) for k in range(q))
                    for q, c in zip(self.q_lens, self.ctx_lens))
        return 4 * self.head_dim * self.num_q_heads * pairs

    def rates(self, time_ms: float) -> dict[str, float]:
        """KV GB/s and attention TFLOP/s at `time_ms` per call."""
        seconds = time_ms * 1e-3
        return {"kv_gbps": self.kv_bytes() / seconds / 1e9, "tflops": self.flops() / seconds / 1e12}

    def shape(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens, "num_seqs": self.num_seqs,
                "q_lens": _summary(self.q_lens), "ctx_lens": _summary(self.ctx_lens),
                "num_q_heads": self.num_q_heads, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "page_size": self.page_size, "dtype": self.dtype,
                "sliding_window": self.sliding_window}


def _summary(xs: tuple[int, ...]) -> str:
    return f"{len(xs)}x{xs[0]}" if len(set(xs)) == 1 else ",".join(map(str, xs))


def _decode(b: int, ctx: int, **kw) -> Case:
    window = f" window{kw['sliding_window']}" if kw.get("sliding_window") else ""
    return Case(f"decode B{b} ctx{ctx}{window}", "decode", (1,) * b, (ctx,) * b, b, b, **kw)


def _prefill(chunk: int, offset: int, num_seqs: int = 8, label: str = "", **kw) -> Case:
    return Case(f"prefill {chunk} @{offset}{label}", "prefill", (chunk,), (offset + chunk,), chunk,
                num_seqs, **kw)


def _mixed(num_decodes: int, ctx: int, chunk: int, num_tokens: int, num_seqs: int,
           label: str = "") -> Case:
    """A chunked-prefill step: num_decodes decodes at context ctx, then one fresh prompt chunk."""
    return Case(f"mixed {num_decodes}x1 ctx{ctx} + {chunk}{label}", "mixed",
                (1,) * num_decodes + (chunk,), (ctx,) * num_decodes + (chunk,), num_tokens,
                num_seqs)


FULL_CASES = [
    _decode(64, 2048), _decode(256, 1024), _decode(32, 8192), _decode(1, 4096),
    _prefill(512, 0), _prefill(512, 1536), _prefill(2048, 0), _prefill(2048, 2048),
    # The engine's steady chunked-prefill step at 256 sequences, and its two halves alone.
    _mixed(255, 512, 288, 640, 256), _decode(255, 512), _prefill(288, 0),
    # As the engine pads them: N = T up to max_num_seqs (1,024 by default), so the Triton
    # kernels take their decode tiles; past it, N = 1,024.
    _prefill(512, 0, num_seqs=512, label=" N512"), _prefill(1024, 0, num_seqs=1024, label=" N1024"),
    _prefill(2048, 0, num_seqs=1024, label=" N1024"), _mixed(255, 512, 288, 640, 640, " N640"),
    # A sliding-window decode at four times its window, and the unwindowed decodes of the window's
    # length and of the whole context.
    _decode(64, 4096, sliding_window=1024), _decode(64, 1024), _decode(64, 4096),
]
_SMALL = dict(num_q_heads=8, num_kv_heads=2, head_dim=64, page_size=16)
SMALL_CASES = [
    _decode(4, 70, **_SMALL), _decode(2, 33, **_SMALL), _decode(2, 70, sliding_window=24, **_SMALL),
    _prefill(24, 0, num_seqs=2, **_SMALL), _prefill(20, 40, num_seqs=2, **_SMALL),
]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `kernels` (and its options) on a `pjllm bench` subparsers object."""
    parser = subparsers.add_parser(
        "kernels", help="time the paged attention kernels against XLA, jax's bundled Pallas op "
                        "and cuDNN", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser)
    return parser


def add_options(parser: argparse.ArgumentParser) -> None:
    """The options of `pjllm bench kernels`."""
    add_case_args(parser)
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help=f"comma-separated subset of {','.join(IMPLS)}")
    add_timing_args(parser)
    parser.add_argument("--output-json", default=None, help="write the results to this JSON file")


def add_case_args(parser: argparse.ArgumentParser) -> None:
    """Which cases run, and the seed of their random inputs."""
    parser.add_argument("--small", action="store_true",
                        help="tiny shapes (the default on CPU, where Pallas runs interpreted)")
    parser.add_argument("--cases", default="",
                        help="comma-separated substrings; run the cases whose name has one")
    parser.add_argument("--seed", type=int, default=0)


def add_timing_args(parser: argparse.ArgumentParser) -> None:
    """How `time_calls` times one (case, implementation)."""
    parser.add_argument("--target-ms", type=float, default=4.0,
                        help="device work per timed rep; sets the number of chained calls")
    parser.add_argument("--max-calls", type=int, default=512, help="most calls per timed rep")
    parser.add_argument("--unroll", type=int, default=16,
                        help="calls per loop iteration of the timed executable")
    parser.add_argument("--reps", type=int, default=30, help="most timed reps per measurement")
    parser.add_argument("--min-reps", type=int, default=None,
                        help="fewest timed reps (default 5 on GPU, 1 on CPU)")
    parser.add_argument("--time-per-measurement", type=float, default=1.0,
                        help="seconds of timed reps to aim for per (case, implementation)")


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    metadata: Any                    # AttentionMetadata on device
    qs: list                         # one q [T, Hq, D] per call
    kvs: list                        # KV page sets [2, Hkv, P, ps, D] (rotated)
    sm_scale: float
    extra: dict                      # per-implementation layouts, built on demand
    sliding_window: int | None = None


def _kv_sets(case: Case, on_gpu: bool) -> int:
    """Copies of the KV pages to rotate through so that repeated calls do not hit in L2 (50-60 MB
    on an H100 / H200): at least 256 MB in all, at most 16 copies."""
    if not on_gpu:
        return 1
    return int(min(16, max(1, math.ceil(256e6 / case.kv_bytes()))))


def make_inputs(case: Case, *, seed: int, on_gpu: bool) -> Inputs:
    import jax
    import jax.numpy as jnp

    from pjllm.kernels.testing import random_ragged_layout

    rng = np.random.default_rng(seed)
    total_pages = sum(-(-c // case.page_size) for c in case.ctx_lens) + 8
    md = random_ragged_layout(rng, list(case.q_lens), list(case.ctx_lens),
                              page_size=case.page_size, num_tokens=case.num_tokens,
                              num_seqs=case.num_seqs, num_pages=total_pages, width=case.max_pages)
    md = jax.tree.map(jnp.asarray, md)
    dtype = jnp.dtype(case.dtype)
    key = jax.random.key(seed)
    qkey, kvkey = jax.random.split(key)
    q_shape = (case.num_tokens, case.num_q_heads, case.head_dim)
    kv_shape = (2, case.num_kv_heads, total_pages, case.page_size, case.head_dim)
    draw = jax.jit(lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype),
                   static_argnums=1)
    qs = [draw(qkey, q_shape)]
    kvs = [draw(k, kv_shape) for k in jax.random.split(kvkey, _kv_sets(case, on_gpu))]
    return Inputs(md, qs, kvs, case.head_dim ** -0.5, {}, case.sliding_window)


def reference_output(inputs: Inputs) -> np.ndarray:
    """The pure-jnp reference's output on the first q and KV set, in float32: the yardstick."""
    import jax
    import jax.numpy as jnp

    from pjllm.kernels import reference

    out = jax.jit(lambda q, kv: reference.paged_attention_reference(
        q, kv, inputs.metadata, sm_scale=inputs.sm_scale, sliding_window=inputs.sliding_window)
    )(inputs.qs[0], inputs.kvs[0])
    return np.asarray(out.astype(jnp.float32))


# ----------------------------------------------------------------------------- the kernel


def pallas_fn(case: Case, inputs: Inputs, interpret: bool, config: BlockConfig | None = None) -> Callable:
    """The Pallas kernel on the case's metadata, as fn(q, kv); `config` overrides its table."""
    from pjllm.kernels import paged_attention as pallas_attention

    md, scale, window = inputs.metadata, inputs.sm_scale, inputs.sliding_window
    return lambda q, kv: pallas_attention.paged_attention(q, kv, md, sm_scale=scale,
                                                          interpret=interpret, config=config,
                                                          sliding_window=window)


def hopper_fn(case: Case, inputs: Inputs, interpret: bool) -> Callable:
    """The Mosaic GPU prefill kernel on the case's metadata, as fn(q, kv); NotImplementedError
    for the shapes `hopper_prefill.supports` rejects. (It runs decode cases of whole 64-token
    tiles too, for comparison; the engine sends decode buckets to the Triton kernel.)"""
    from pjllm.kernels import hopper_prefill

    q, kv = inputs.qs[0], inputs.kvs[0]
    if not hopper_prefill.supports(
            q, kv, sliding_window=inputs.sliding_window, alibi=False):
        raise NotImplementedError(case.name)
    if not interpret and not hopper_prefill.on_hopper():
        raise NotImplementedError("needs a Hopper GPU")
    md, scale = inputs.metadata, inputs.sm_scale
    return lambda q, kv: hopper_prefill.prefill_attention(q, kv, md, sm_scale=scale,
                                                          interpret=interpret)


# ----------------------------------------------------------------------------- timing


def time_calls(fn: Callable, q, kvs: list, *, reps: int, min_reps: int, seconds: float,
               target_ms: float = 4.0, max_calls: int = 512, unroll: int = 8,
               device_timer: DeviceTimer | None = None, iters: int | None = None) -> dict[str, Any]:
    """Per-call time of fn(q, kv), in ms.

    One jitted executable runs a chain of calls (each call's output is the next call's q, so XLA
    can neither merge nor reorder them), `unroll` calls per iteration of a fori_loop, rotating
    through the KV sets; the iteration count is chosen so that one rep holds about `target_ms` of
    device work (or `iters` iterations, when given). Each rep is synchronized; time_ms = median
    over reps of rep time / calls.
    A `device_timer` is then given the same executable, e.g. to run it under a profiler; its fields
    join the result (an exception becomes `device_timer_error`).
    Returns {"time_ms", "min_ms", "spread_ms", "reps", "calls", "first_out", ...}.
    """
    import jax
    from jax import lax

    num_sets = len(kvs)
    unroll = num_sets * max(1, -(-unroll // num_sets))
    first_out = jax.block_until_ready(jax.jit(fn)(q, kvs[0]))

    def build(iters: int):
        def chained(q, kvs):
            def body(i, x):
                for j in range(unroll):
                    x = fn(x, kvs[j % num_sets])
                return x
            return lax.fori_loop(0, iters, body, q)
        run = jax.jit(chained)
        jax.block_until_ready(run(q, kvs))
        jax.block_until_ready(run(q, kvs))   # (Pallas interpret mode compiles a second time)
        return run

    def one_rep(run) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(run(q, kvs))
        return time.perf_counter() - t0

    if iters is None:
        iters = 1
        run = build(iters)
        estimate = one_rep(run) / unroll
        want = int(min(max(1, math.ceil(target_ms * 1e-3 / max(estimate, 1e-9) / unroll)),
                       max(1, max_calls // unroll)))
        if want != iters:
            iters = want
            run = build(iters)
    else:
        run = build(iters)
    calls = iters * unroll
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < reps:
        times.append(one_rep(run) / calls)
        if len(times) >= min_reps and time.perf_counter() > deadline:
            break
    times_ms = sorted(1e3 * t for t in times)
    spread = (times_ms[(3 * len(times_ms)) // 4] - times_ms[len(times_ms) // 4]
              if len(times_ms) >= 4 else None)
    out = {"time_ms": statistics.median(times_ms), "min_ms": times_ms[0], "reps": len(times),
           "spread_ms": spread, "calls": calls, "iters": iters, "first_out": first_out}
    if device_timer is not None:
        try:
            out.update(device_timer(run, (q, kvs), calls))
        except Exception as exc:  # noqa: BLE001 - device time is a bonus, not a requirement
            out["device_timer_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return out


def timing_options(args: argparse.Namespace, on_gpu: bool) -> dict[str, Any]:
    """`time_calls` keywords from the timing options."""
    if not on_gpu:                       # interpret mode: one call per rep is plenty
        return {"target_ms": 0.0, "max_calls": 1, "unroll": 1}
    return {"target_ms": args.target_ms, "max_calls": args.max_calls, "unroll": args.unroll}


def output_errors(out, want: np.ndarray) -> dict[str, float]:
    """Max abs and relative (||out - want|| / ||want||) error; NaN when out is not finite."""
    out = np.asarray(out, np.float32).reshape(want.shape)
    diff = out - want
    finite = bool(np.isfinite(out).all())
    return {"max_abs_err": float(np.max(np.abs(diff))) if finite else float("nan"),
            "rel_err": (float(np.linalg.norm(diff) / max(np.linalg.norm(want), 1e-30))
                        if finite else float("nan"))}


# ----------------------------------------------------------------------------- driver


def select_cases(names: str, small: bool) -> list[Case]:
    """The cases (SMALL_CASES if `small`, else FULL_CASES) whose name has one of the
    comma-separated substrings in `names` (all of them when it is empty)."""
    cases = SMALL_CASES if small else FULL_CASES
    wanted = [w.strip() for w in names.split(",") if w.strip()]
    return [c for c in cases if any(w in c.name for w in wanted)] if wanted else cases


def measure_case(case: Case, impls: list[str], args: argparse.Namespace, *, on_gpu: bool,
                 min_reps: int, device_timer: DeviceTimer | None = None) -> list[dict[str, Any]]:
    """Every implementation on one case; the reference's output is the yardstick."""
    import jax.numpy as jnp

    from pjllm.kernels import paged_attention as pallas_attention

    interpret = not on_gpu
    inputs = make_inputs(case, seed=args.seed, on_gpu=on_gpu)
    want = reference_output(inputs)
    real = int(sum(case.q_lens))
    records = []
    for impl in impls:
        rec: dict[str, Any] = {"case": case.name, "kind": case.kind, "impl": impl,
                               "shape": case.shape(),
                               "kv_sets": len(inputs.kvs), "kv_bytes": case.kv_bytes(),
                               "flops": case.flops()}
        try:
            qs, kvs, yardstick = inputs.qs, inputs.kvs, want
            if impl == "pallas":
                fn = pallas_fn(case, inputs, interpret)
                rec["config"] = dataclasses.asdict(launch_config(case))
                rec["kernel"] = pallas_attention.kernel_mode(case.num_tokens, case.num_seqs)
            elif impl == "hopper":
                fn = hopper_fn(case, inputs, interpret)
            elif impl == "reference":
                fn = baselines.reference_fn(case, inputs, interpret)
            elif impl == "jax_bundled":
                fn, qs, kvs = baselines.bundled_fn(case, inputs, interpret)
            elif impl in baselines.DENSE_BASELINES:
                fn, qs, kvs, rec["implementation"] = baselines.DENSE_BASELINES[impl](
                    case, inputs, on_gpu)
                yardstick = want[None, :real]
            else:
                raise ValueError(f"unknown implementation {impl!r}")
            timing = time_calls(fn, qs[0], kvs, reps=args.reps, min_reps=min_reps,
                                seconds=args.time_per_measurement, **timing_options(args, on_gpu),
                                device_timer=device_timer)
            out = timing.pop("first_out")
            if impl not in baselines.DENSE_BASELINES:
                out = np.asarray(out.astype(jnp.float32))[:real]
                yardstick = yardstick[:real]
            rec.update(output_errors(np.asarray(out, np.float32), yardstick))
            rec.update(timing)
            rec.update(case.rates(rec["time_ms"]))
            if "device_ms" in rec:
                rec.update({"device_" + k: v for k, v in case.rates(rec["device_ms"]).items()})
        except NotImplementedError:
            continue
        except Exception as exc:  # noqa: BLE001 - one failing implementation must not stop the run
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        records.append(rec)
        print(_one_line(rec), flush=True)
    pallas = next((r for r in records if r["impl"] == "pallas" and "time_ms" in r), None)
    for rec in records:
        if pallas is not None and "time_ms" in rec:
            rec["vs_pallas"] = rec["time_ms"] / pallas["time_ms"]
    return records


def launch_config(case: Case, config: BlockConfig | None = None) -> BlockConfig:
    """The Pallas kernel's BlockConfig for a case (`config`, else its table's), as it launches it."""
    from pjllm.kernels import paged_attention as pa

    return pa.launch_config(case.num_tokens, case.num_seqs, num_q_heads=case.num_q_heads,
                            num_kv_heads=case.num_kv_heads, head_dim=case.head_dim,
                            page_size=case.page_size, max_context=case.max_context,
                            dtype=case.dtype, config=config)


def _one_line(rec: dict[str, Any]) -> str:
    if "error" in rec:
        return f"  {rec['case']:22s} {rec['impl']:12s} FAILED {rec['error']}"
    return (f"  {rec['case']:22s} {rec['impl']:12s} {rec['time_ms']:9.4f} ms "
            f"{rec['kv_gbps']:8.1f} GB/s {rec['tflops']:7.2f} TFLOP/s rel_err {rec['rel_err']:.1e}")


def tolerance(case: Case) -> float:
    """The largest relative error against the reference that counts as correct."""
    return 2e-2 if case.dtype == "bfloat16" else 1e-4


# ----------------------------------------------------------------------------- entry point

COLUMNS = [("case", "case", ""), ("impl", "impl", ""), ("time_ms", "ms", ".4f"),
           ("kv_gbps", "KV GB/s", ".0f"), ("tflops", "TFLOP/s", ".1f"),
           ("device_ms", "device ms", ".4f"), ("device_kv_gbps", "dev GB/s", ".0f"),
           ("vs_pallas", "x pallas time", ".2f"), ("rel_err", "rel err", ".1e"),
           ("error", "error", "")]


def device_env(argv: list[str] | None) -> dict[str, Any]:
    """The record's env block (date, versions, command) with the jax device."""
    return environment(argv, jax_device_info)


def run(args: argparse.Namespace, device_timer: DeviceTimer | None = None) -> int:
    """Runs the benchmark; prints a table; returns the exit status (1 if the Pallas kernel failed
    or differs from the reference). On GPU, `device_timer` adds fields to every timing."""
    import jax

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    on_gpu = jax.default_backend() == "gpu"
    small = args.small or not on_gpu
    min_reps = args.min_reps or (5 if on_gpu else 1)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        print(f"unknown implementations: {sorted(unknown)}", file=sys.stderr)
        return 2
    cases = select_cases(args.cases, small)
    if not cases:
        print("no case matches --cases", file=sys.stderr)
        return 2
    env = device_env(getattr(args, "cli_argv", None))
    print(f"device: {env.get('device')} | jax {jax.__version__} | "
          f"{'interpret mode, small shapes' if not on_gpu else ('small shapes' if small else 'Llama-3-8B shapes')}",
          flush=True)
    payload: dict[str, Any] = {"benchmark": "kernels", "env": env, "small": small, "results": []}
    status = 0
    for case in cases:
        print(f"{case.name}:", flush=True)
        recs = measure_case(case, impls, args, on_gpu=on_gpu, min_reps=min_reps,
                            device_timer=device_timer if on_gpu else None)
        for rec in recs:
            rec["env"] = env
        payload["results"].extend(recs)
        if any("error" in r and r["impl"] == "pallas" for r in recs):
            status = 1
        if any(r["impl"] == "pallas" and r.get("rel_err", 0) > tolerance(case) for r in recs):
            print(f"  pallas output of {case.name} differs from the reference", flush=True)
            status = 1
        write_json(args.output_json, payload)       # after each case: partial results survive a kill
    print(f"\n== bench kernels: {env.get('device')}, {env.get('date')} ==")
    print(format_table(payload["results"], COLUMNS))
    return status


def main(argv: list[str] | None = None) -> int:
    """`python -m pjllm.bench.kernels ...` (the same options as `pjllm bench kernels`)."""
    parser = argparse.ArgumentParser(prog="python -m pjllm.bench.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.cli_argv = ["bench", "kernels", *argv]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
