"""An LLM gives back all its device memory when shut down or dropped, so notebooks and scripts
can build one after another; and a float32 engine's programs compute in float32."""

import gc
import re

import jax
import pytest

import pjllm
from pjllm.runner import memory
from pjllm.runner.memory import kv_cache_budget

GREEDY = pjllm.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
OPTIONS = dict(load_format="dummy", dtype="float32", max_model_len=128, page_size=8, max_num_seqs=8,
               max_num_batched_tokens=64, seed=0, compilation_cache_dir=None)


def _answer(llm):
    return llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def _live_arrays():
    gc.collect()
    return len(jax.live_arrays())


def test_shutdown_frees_every_array_and_stops_the_warmup(tiny_model_path):
    before = _live_arrays()
    llm = pjllm.LLM(tiny_model_path, warmup="background", **OPTIONS)
    first = _answer(llm)
    assert _live_arrays() > before
    llm.shutdown()
    assert _live_arrays() == before
    assert not llm.engine.model_runner.programs._warmup_thread.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        _answer(llm)
    llm.shutdown()  # idempotent
    with pjllm.LLM(tiny_model_path, warmup="background", **OPTIONS) as second:
        assert _answer(second) == first
    assert _live_arrays() == before


def test_a_dropped_llm_frees_its_arrays(tiny_model_path):
    before = _live_arrays()
    llm = pjllm.LLM(tiny_model_path, warmup="background", **OPTIONS)
    first = _answer(llm)
    del llm  # while its warmup may still be compiling
    assert _live_arrays() == before
    llm = pjllm.LLM(tiny_model_path, **OPTIONS)
    assert _answer(llm) == first
    del llm
    assert _live_arrays() == before


def test_kv_budget_is_the_engines_share_of_the_device():
    gib = 2**30
    # 0.4 of a 100 GiB device, 10 GiB of weights and 2 of activations: 28 GiB of KV cache,
    # whatever another engine in this process already holds (40 GiB here).
    share = dict(utilization=0.4, total_bytes=100 * gib, pool_limit_bytes=95 * gib,
                 weights_bytes=10 * gib, activation_bytes=2 * gib)
    assert kv_cache_budget(pool_in_use_bytes=50 * gib, **share) == 28 * gib
    # Capped by what this process's allocator has left.
    assert kv_cache_budget(pool_in_use_bytes=80 * gib, **share) == 13 * gib


def test_kv_budget_under_an_allocator_that_reports_no_limit(monkeypatch):
    # The cudaMallocAsync pool reports bytes_limit 0: the device's total is the cap instead.
    gib = 2**30

    class PoolDevice:
        platform = "gpu"

        def memory_stats(self):
            return {"bytes_limit": 0, "bytes_in_use": 0}

    monkeypatch.setattr(memory, "device_total_memory", lambda device: 100 * gib)
    assert memory.kv_cache_bytes(PoolDevice(), utilization=0.9, weights_bytes=15 * gib,
                                 activation_bytes=2 * gib, host_bytes_wanted=gib) == 73 * gib


@pytest.mark.parametrize("dtype,precision", [("float32", "HIGHEST"), ("bfloat16", "DEFAULT")])
def test_every_dot_of_a_step_runs_at_the_dtypes_precision(tiny_model_path, dtype, precision):
    """float32 means float32 in every matmul and attention dot (no TF32 on GPUs); bf16 keeps
    the backend default."""
    # The reference attention path: its dots are XLA's (the Pallas kernels' own float32 dots are
    # checked in tests/kernels).
    with pjllm.LLM(tiny_model_path, attention_backend="reference", **{**OPTIONS, "dtype": dtype}) as llm:
        runner = llm.engine.model_runner
        for tokens in (16, 64):  # a decode and a prefill bucket
            text = runner.programs.lower(("forward", tokens)).as_text()
            dots = re.findall(r"stablehlo\.dot_general.*", text)
            assert len(dots) >= 7  # qkv, attention x2, o, gate_up, down, logits
            assert all(f"precision = [{precision}, {precision}]" in dot for dot in dots), dots
