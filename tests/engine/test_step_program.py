"""The compiled step programs on CPU: buckets that fit a decode, and the KV cache updated in place."""

import re

import numpy as np

from pjllm import SamplingParams
from pjllm.runner.step import TRITON_GEMM_MAX_TOKENS, forward_compiler_options


def _kv_sized_results(hlo: str, num_elements: int) -> list[str]:
    """Instructions of the entry computation that produce a new array as large as one layer's KV
    cache (parameters, bitcasts and tuple plumbing excluded)."""
    entry = hlo[hlo.index("\nENTRY"):]
    found = []
    for line in entry.splitlines():
        match = re.match(r"\s*(ROOT )?%\S+ = \w+\[([\d,]*)\]\S* ([\w-]+)\(", line)
        if match and match.group(3) not in ("parameter", "bitcast", "get-tuple-element", "tuple"):
            if np.prod([int(d) for d in match.group(2).split(",") if d]) == num_elements:
                found.append(line.strip()[:120])
    return found


def test_decode_steps_use_small_buckets_and_update_the_kv_cache_in_place(make_llm):
    llm = make_llm()
    runner = llm.engine.model_runner
    assert runner.token_buckets[:4] == [1, 2, 4, 8]  # CPU: a batch-1 decode computes 1 token
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for batch in (1, 3):  # a 1-token step writes its KV by dynamic-update-slice, more by scatter
        llm.generate([{"prompt_token_ids": [5, 6, 7]}] * batch, params, use_tqdm=False)
    num_layers = llm.engine.model_config.num_layers
    kv_elements = runner.kv_caches[0].size
    programs = {key[1]: future.result() for key, future in runner.programs._futures.items()
                if key[0] == "forward"}
    assert {1, 4} <= set(programs)
    for tokens, program in programs.items():
        # One in-place update per layer; a copy of the cache (as XLA made when the attention read
        # a reshaped view of a dynamic-update-slice's result) costs more than a decode step.
        writes = _kv_sized_results(program.as_text(), kv_elements)
        assert len(writes) == num_layers, (tokens, writes)


def test_only_the_forwards_of_the_smallest_buckets_use_triton_gemms():
    # Triton GEMMs read the weights faster at a handful of tokens; cuBLAS wins above (docs/perf.md).
    assert forward_compiler_options(TRITON_GEMM_MAX_TOKENS)["xla_gpu_enable_triton_gemm"]
    assert not forward_compiler_options(TRITON_GEMM_MAX_TOKENS + 1)["xla_gpu_enable_triton_gemm"]
    assert not forward_compiler_options(8192)["xla_gpu_enable_triton_gemm"]
