"""`pjllm bench kernels` on CPU: tiny shapes, Pallas in interpret mode, every implementation."""

from __future__ import annotations

import argparse
import json

import pytest

from pjllm.bench import kernels as bench_kernels


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_kernels.add_parser(parser.add_subparsers(dest="bench"))
    return parser.parse_args(["kernels", *argv])


def test_bench_kernels_table_and_json(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    status = bench_kernels.run(_args("--cases", "B2 ctx33,24 @0", "--reps", "1",
                                     "--time-per-measurement", "0", "--output-json", str(out)))
    assert status == 0
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "kernels" and payload["small"] is True
    assert payload["env"]["device"]
    records = {(r["case"], r["impl"]): r for r in payload["results"]}
    assert set(records) == {("decode B2 ctx33", "pallas"), ("decode B2 ctx33", "reference"),
                            ("decode B2 ctx33", "jax_bundled"), ("prefill 24 @0", "pallas"),
                            ("prefill 24 @0", "reference"), ("prefill 24 @0", "cudnn")}
    for rec in records.values():
        assert "error" not in rec, rec
        for key in ("time_ms", "kv_gbps", "tflops", "rel_err", "max_abs_err", "reps", "calls",
                    "kv_bytes", "flops", "shape", "vs_pallas", "env"):
            assert key in rec, key
        assert rec["time_ms"] > 0 and rec["rel_err"] < 2e-2, rec
    assert records[("decode B2 ctx33", "pallas")]["kernel"] == "decode"
    assert records[("prefill 24 @0", "pallas")]["kernel"] == "prefill"
    # The tiles as launched: the split count the kernel resolves, not the table's "choose" (None).
    assert records[("decode B2 ctx33", "pallas")]["config"]["kv_splits"] >= 1
    # bf16 inputs: 2 * 2 * 33 tokens * 2 kv heads * 64 * 2 bytes of KV; 4 * 64 * 8 * 33 flops.
    assert records[("decode B2 ctx33", "pallas")]["kv_bytes"] == 2 * 2 * 33 * 2 * 64 * 2
    assert records[("decode B2 ctx33", "pallas")]["flops"] == 2 * 4 * 64 * 8 * 33
    table = capsys.readouterr().out
    assert "KV GB/s" in table and "jax_bundled" in table and "cudnn" in table


def test_bench_kernels_sliding_window_case(tmp_path):
    """A windowed decode matches the windowed reference and counts only its window's bytes; the
    other implementations have no window and are skipped."""
    out = tmp_path / "kernels.json"
    status = bench_kernels.run(_args("--cases", "window24", "--reps", "1",
                                     "--time-per-measurement", "0", "--output-json", str(out)))
    assert status == 0
    records = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert set(records) == {"pallas", "reference"}
    pallas = records["pallas"]
    assert pallas["rel_err"] < 2e-2 and pallas["shape"]["sliding_window"] == 24
    # Context 70, window 24: 24 keys of 2 sequences, K and V, 2 kv heads, head_dim 64, bf16.
    assert pallas["kv_bytes"] == 2 * 2 * 24 * 2 * 64 * 2
    assert pallas["flops"] == 2 * 4 * 64 * 8 * 24


def test_bench_kernels_rejects_unknown_impl():
    assert bench_kernels.run(_args("--impls", "pallas,nope")) == 2


@pytest.mark.parametrize("case", bench_kernels.FULL_CASES)
def test_full_cases_are_the_issue_shapes(case):
    assert (case.num_q_heads, case.num_kv_heads, case.head_dim, case.page_size, case.dtype) == (
        32, 8, 128, 16, "bfloat16")
    assert case.kv_bytes() > 0 and case.flops() > 0
    if case.sliding_window:  # a windowed decode reads the window, not the whole context
        assert case.kv_bytes() == 2 * case.num_seqs * case.sliding_window * 8 * 128 * 2
