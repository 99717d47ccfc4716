"""Which tiles a paged attention launch uses: `BlockConfig`, the tuning table that
`benchmarks/tune_kernels.py` writes beside this package (`paged_attention_tuning.json`), and
`select_config`, the nearest table entry for a shape (else a default)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch parameters of one kernel instance.

    block_rows: query rows per program (tokens * padded group size), a power of 2 >= 16.
    block_kv:   keys per inner-loop step, a power of 2 >= 16.
    kv_splits:  programs sharing one sequence's (or work item's) keys (flash-decoding), combined
                afterwards in XLA; None = chosen from the grid size (see num_kv_splits).
    programs_per_sm: decode tiles only. 0 = one program per (work item, kv head, split); k > 0 =
                a persistent grid of k * (multiprocessor count) programs that stride over those
                units, so that no partial last wave leaves multiprocessors idle.
    """

    block_rows: int
    block_kv: int
    num_warps: int
    num_stages: int
    kv_splits: int | None = 1
    programs_per_sm: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "BlockConfig":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# Decode tiles for batches of at most this many tokens even when T > N (e.g. the engine pads 8
# decodes to a 16-token bucket).
DECODE_MAX_TOKENS = 16
# Split-KV aims for at least this many programs (about 2 waves on a 132-SM H100).
TARGET_PROGRAMS = 256

# Used where the tuning table has no entry for the mode / head_dim / page size.
DEFAULT_CONFIGS = {
    "decode": BlockConfig(block_rows=16, block_kv=64, num_warps=4, num_stages=2, kv_splits=None),
    "prefill": BlockConfig(block_rows=64, block_kv=64, num_warps=4, num_stages=2),
}

TUNING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "paged_attention_tuning.json")


def shape_key(mode: str, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
              num_tokens: int, num_seqs: int, max_context: int) -> str:
    """The tuning-table key of one shape: mode, heads, head_dim, page size, T and N buckets,
    W * page_size."""
    return (f"{mode}:hq{num_q_heads}:hkv{num_kv_heads}:d{head_dim}:ps{page_size}"
            f":t{num_tokens}:n{num_seqs}:ctx{max_context}")


def _parse_key(key: str) -> dict:
    mode, *fields = key.split(":")
    out: dict = {"mode": mode}
    for f in fields:
        name = f.rstrip("0123456789")
        out[name] = int(f[len(name):])
    return out


@functools.lru_cache(maxsize=None)
def load_tuning_table(path: str = TUNING_FILE) -> dict[str, BlockConfig]:
    """{shape_key: BlockConfig} from the JSON table beside this file ({} if there is none)."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        return {}
    return {k: BlockConfig.from_json(v) for k, v in raw.get("configs", {}).items()}


def kernel_mode(num_tokens: int, num_seqs: int) -> str:
    """"decode" (small blocks: one decode each, KV splits) or "prefill" (blocks sized for
    prefill chunks); see paged_attention.py."""
    return "decode" if num_tokens <= max(num_seqs, DECODE_MAX_TOKENS) else "prefill"


def select_config(num_tokens: int, num_seqs: int, head_dim: int, *,
                  num_q_heads: int | None = None, num_kv_heads: int | None = None,
                  page_size: int | None = None, max_context: int | None = None,
                  dtype=None, table: dict[str, BlockConfig] | None = None) -> BlockConfig:
    """The tile configuration for a shape: the tuning-table entry of the same mode, head_dim and
    page size (and, preferably, heads) whose (T, N, W * page_size) is nearest in log scale; else
    DEFAULT_CONFIGS[mode]. The table is tuned for 16-bit inputs: float32 inputs take the
    defaults, since the table's larger tiles can need more shared memory than a block has."""
    mode = kernel_mode(num_tokens, num_seqs)
    if dtype is not None and jnp.dtype(dtype).itemsize > 2:
        return DEFAULT_CONFIGS[mode]
    table = load_tuning_table() if table is None else table
    best, best_dist = None, math.inf
    for key, cfg in table.items():
        k = _parse_key(key)
        if k["mode"] != mode or k.get("d") != head_dim:
            continue
        if page_size is not None and k.get("ps") != page_size:
            continue
        dist = (abs(math.log2(max(num_seqs, 1) / max(k.get("n", 1), 1)))
                + abs(math.log2(max(num_tokens, 1) / max(k.get("t", num_tokens), 1))))
        if max_context is not None:
            dist += abs(math.log2(max(max_context, 1) / max(k.get("ctx", 1), 1)))
        if (num_q_heads, num_kv_heads) != (k.get("hq"), k.get("hkv")):
            dist += 100.0
        if dist < best_dist:
            best, best_dist = cfg, dist
    return best if best is not None else DEFAULT_CONFIGS[mode]
