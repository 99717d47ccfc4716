"""Tensor parallelism on eight CPU devices: the tiny HF goldens split across 2 and 4 devices,
and a random-weight model across 8, give what one device gives (transformers' prompt logprobs
within 1e-4 and greedy tokens), with every split parameter and the KV cache spread over the
mesh."""

import json
import re

import jax
import numpy as np
import pytest

import pjllm
from pjllm.sharding import MODEL_AXIS, kv_head_replicas, replicate_kv_heads
from tests.golden_outputs import GOLDEN, assert_matches_golden
OPTIONS = dict(dtype="float32", max_model_len=128, page_size=8, max_num_seqs=4,
               max_num_batched_tokens=32, compilation_cache_dir=None, skip_tokenizer_init=True)
# (golden, tensor_parallel_size, attention kernels): GQA with KV heads = TP (qwen3: 2 of 4
# heads), more KV heads than TP (llama2's 4 over 2, bloom's 6 over 2), fewer (llama3's 2 over 4,
# multi-query Falcon's 1 over 2: each device gets a copy), and families other than Llama
# (BLOOM's ALiBi slopes split with the heads, Gemma 3's windowed layers, GPT-2).
CASES = [("llama2", 4, "pallas"), ("qwen3", 2, "pallas"), ("bloom", 2, "reference"),
         ("gemma3", 2, "reference"), ("gpt2", 4, "reference"), ("llama2", 2, "reference"),
         ("llama3", 4, "reference"), ("falcon_mqa", 2, "pallas")]


@pytest.mark.parametrize("name,tp,kernels", CASES, ids=lambda v: str(v))
def test_tensor_parallel_matches_transformers(name, tp, kernels):
    with pjllm.LLM(str(GOLDEN / name), attention_backend=kernels, tensor_parallel_size=tp,
                   **OPTIONS) as llm:
        assert_matches_golden(llm, name)
        runner = llm.engine.model_runner
        for kv in runner.kv_caches:  # split by KV head over all tp devices
            assert len(kv.sharding.device_set) == tp and kv.sharding.spec[1] == MODEL_AXIS
            assert kv.addressable_shards[0].data.shape[1] == kv.shape[1] // tp
        split = [w for w in runner.weights if MODEL_AXIS in tuple(w.sharding.spec)]
        assert split and all(len(w.sharding.device_set) == tp for w in runner.weights)
        held = sum(w.addressable_shards[0].data.nbytes for w in runner.weights)
        assert held < sum(w.nbytes for w in runner.weights) / tp * 1.5  # no device holds it all


def test_tensor_parallel_errors_name_the_field():
    path = str(GOLDEN / "llama2")
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(3\) must divide the model's "
                                         r"num_attention_heads \(4\)"):
        pjllm.LLM(path, tensor_parallel_size=3, **OPTIONS)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(6\) must divide the model's "
                                         r"num_key_value_heads \(8\) or be a multiple of it"):
        kv_head_replicas(12, 8, 6)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(16\) x data_parallel_size "
                                         rf"\(1\) = 16 devices, but only {len(jax.devices())}"):
        pjllm.LLM(str(GOLDEN / "bloom"), tensor_parallel_size=16, **OPTIONS)
    with pytest.raises(ValueError, match="pipeline_parallel_size must be 1"):
        pjllm.LLM(path, pipeline_parallel_size=2, **OPTIONS)


def test_replicated_kv_heads_keep_every_query_with_its_key_and_value():
    """[embed, Hkv=2, G=4 queries + K + V, D] as 2 replicas per KV head: 4 KV heads of 2
    queries each, the queries in their order, each beside a copy of its own K and V."""
    embed, kv_heads, group, head_dim = 3, 2, 4, 5
    fused = np.arange(embed * kv_heads * (group + 2) * head_dim, dtype=np.float32).reshape(
        embed, kv_heads, group + 2, head_dim)
    out = replicate_kv_heads(fused, ("embed", "kv_heads", "qkv", "head_dim"), 2)
    assert out.shape == (embed, 4, 4, head_dim)
    queries = out[:, :, :2].reshape(embed, 8, head_dim)
    np.testing.assert_array_equal(queries, fused[:, :, :group].reshape(embed, 8, head_dim))
    for head in range(4):
        np.testing.assert_array_equal(out[:, head, 2:], fused[:, head // 2, group:])
    assert kv_head_replicas(4, 2, 4) == 2 and kv_head_replicas(4, 4, 2) == 1
    norm = np.ones(5, np.float32)  # a parameter without the fused axes comes back as it is
    assert replicate_kv_heads(norm, ("head_dim",), 2) is norm


def test_a_step_moves_no_parameters_between_devices():
    """The compiled TP forward's collectives are all-reduces of activations and one gather of
    the logits: no parameter (output layer, gate/up, ...) is gathered from its shards."""
    with pjllm.LLM(str(GOLDEN / "llama2"), tensor_parallel_size=2, warmup="blocking",
                   attention_backend="reference", **OPTIONS) as llm:
        runner = llm.engine.model_runner
        hidden, vocab = llm.engine.model_config.hidden_size, llm.engine.model_config.vocab_size
        for key in [k for k in runner.programs.keys() if k[0] == "forward"]:
            tokens, rows = key[1], runner.max_num_seqs
            text = runner.programs.get(key).as_text()
            gathers = re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} all-gather\(", text)
            reduces = re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} all-reduce\(", text)
            assert set(gathers) <= {f"{n},{vocab}" for n in range(1, rows + 1)}, (key, gathers)
            assert reduces and set(reduces) == {f"{tokens},{hidden}"}, (key, reduces)


def test_eight_devices_give_what_one_gives(tmp_path):
    """TP 8, which no golden's heads allow (they have 4 or 6): a random-weight Llama of 8 heads
    and 2 KV heads (each copied to 4 devices) gives one device's greedy tokens and prompt
    logprobs (dummy weights are drawn the same on any mesh)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256,
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "eos_token_id": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    prompts = [[5, 17, 3, 99, 42, 7], [7, 7, 8]]
    params = pjllm.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                  prompt_logprobs=1)
    tokens, logprobs = [], []
    for tp in (1, 8):
        with pjllm.LLM(str(tmp_path), load_format="dummy", tensor_parallel_size=tp, seed=3,
                       attention_backend="reference", **OPTIONS) as llm:
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                   use_tqdm=False)
            kv = llm.engine.model_runner.kv_caches[0]
            assert len(kv.sharding.device_set) == tp
        tokens.append([o.outputs[0].token_ids for o in outputs])
        logprobs.append(np.concatenate([[o.prompt_logprobs[i][p[i]].logprob
                                         for i in range(1, len(p))]
                                        for o, p in zip(outputs, prompts)]))
    assert tokens[0] == tokens[1]
    np.testing.assert_allclose(logprobs[1], logprobs[0], atol=1e-4, rtol=0)
    assert np.ptp(logprobs[0]) > 0.1  # a model, not a constant
