"""GPU time by kernel and kind from the two trace formats `compare_hf throughput --profile-dir` writes
(JAX and torch)."""

import gzip
import json

import pytest

from benchmarks import device_profile


def _write_trace(folder, events):
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "run.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_jax_trace_counts_only_gpu_processes(tmp_path):
    _write_trace(tmp_path, [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "name": "paged_decode_attention", "dur": 300.0},
        {"ph": "X", "pid": 1, "name": "nvjet_sm90_tst_256x128", "dur": 500.0},
        {"ph": "X", "pid": 1, "name": "nvjet_sm90_tst_256x128", "dur": 500.0},
        {"ph": "X", "pid": 2, "name": "PjitFunction(step)", "dur": 9000.0},  # host: not GPU time
    ])
    times = device_profile.kernel_times(str(tmp_path))
    assert set(times) == {"paged_decode_attention", "nvjet_sm90_tst_256x128"}
    assert times["nvjet_sm90_tst_256x128"].calls == 2
    seconds = device_profile.by_kind(times)
    assert seconds["attention"] == pytest.approx(300e-6) and seconds["matmul"] == pytest.approx(1000e-6)
    assert seconds["total"] == pytest.approx(1300e-6)


def test_jax_trace_counts_stream_lines_not_their_derived_op_lines(tmp_path):
    _write_trace(tmp_path, [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 10, "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 11, "args": {"name": "XLA Ops"}},
        {"ph": "X", "pid": 1, "tid": 10, "name": "paged_decode_attention", "dur": 300.0, "ts": 0.0},
        {"ph": "X", "pid": 1, "tid": 11, "name": "paged_decode_attention", "dur": 300.0, "ts": 0.0},
    ])
    times = device_profile.kernel_times(str(tmp_path))
    assert times["paged_decode_attention"].calls == 1
    assert device_profile.by_kind(times)["attention"] == pytest.approx(300e-6)


def test_torch_trace_counts_only_gpu_categories(tmp_path):
    _write_trace(tmp_path, [
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "python"}},
        {"ph": "X", "pid": 7, "cat": "cuda_runtime", "name": "cudaLaunchKernel", "dur": 5000.0},
        {"ph": "X", "pid": 0, "cat": "kernel", "name": "pytorch_flash::flash_fwd_kernel", "dur": 200.0},
        {"ph": "X", "pid": 0, "cat": "kernel", "name": "fmha_cutlassF_bf16_aligned_64x128", "dur": 100.0},
        {"ph": "X", "pid": 0, "cat": "kernel", "name": "sm90_xmma_gemm_bf16bf16", "dur": 400.0},
        {"ph": "X", "pid": 0, "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "dur": 50.0},
        {"ph": "X", "pid": 0, "cat": "kernel", "name": "indexSelectLargeIndex", "dur": 25.0},
    ])
    seconds = device_profile.by_kind(device_profile.kernel_times(str(tmp_path)))
    assert seconds == pytest.approx({"attention": 300e-6, "matmul": 400e-6, "copy": 50e-6, "other": 25e-6,
                                     "total": 775e-6})
