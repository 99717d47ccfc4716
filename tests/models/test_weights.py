"""Configs, weights and tokenizers from HF directories and GGUF files (pjllm.models.weights)."""

from __future__ import annotations

import json
import os
import shutil

import gguf
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pjllm.config import ModelConfig
from pjllm.models import gguf_file
from pjllm.models.qwen3 import Qwen3ForCausalLM
from pjllm.models.registry import MODELS, resolve_architecture
from pjllm.models.weights import (expected_state_dict_shapes, load_hf_config, load_hf_state_dict,
                                  load_tokenizer, open_hf_state_dict)

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden")
TINY_MODELS = ("llama2", "llama3", "mistral", "qwen2", "llama_tied_mqa")


# --------------------------------------------------------------------------------------------
# Real GGUF files: the default model (SmolLM2-135M-Instruct Q4_1) and Gemma 3 270M Q4_K_M


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    from pjllm.models.default_model import download_default_model

    try:
        return download_default_model()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"default model SmolLM2 GGUF not cached and could not be downloaded: {e}")


@pytest.fixture(scope="module")
def gemma3_path() -> str:
    from pjllm.models.default_model import download_model

    try:
        return download_model("gemma-3-270m")
    except (RuntimeError, OSError) as e:
        pytest.skip(f"Gemma 3 270M GGUF not cached and could not be downloaded: {e}")


@pytest.fixture(scope="module")
def smollm2_chat() -> dict:
    with open(os.path.join(GOLDEN, "smollm2_chat.json")) as f:
        return json.load(f)


def test_smollm2_state_dict_matches_transformers(smollm2_path: str) -> None:
    golden = np.load(os.path.join(GOLDEN, "smollm2_gguf.npz"))
    state = load_hf_state_dict(smollm2_path, "float32")
    cfg = ModelConfig.from_hf_config(load_hf_config(smollm2_path))
    assert set(state) == set(expected_state_dict_shapes(cfg))
    names = sorted({key.split(":")[0] for key in golden.files})
    assert len(names) >= 15
    for name in names:
        tensor = state[name]
        assert tensor.dtype == np.float32
        assert tensor.shape == tuple(golden[f"{name}:shape"]), name
        rows = golden[f"{name}:rows"]
        values = tensor[rows] if tensor.ndim == 2 else tensor
        np.testing.assert_array_equal(values, golden[f"{name}:values"], err_msg=name)
        total = tensor.astype(np.float64)
        np.testing.assert_allclose(total.sum(), golden[f"{name}:sum"], rtol=1e-9, atol=1e-6,
                                   err_msg=name)
        np.testing.assert_allclose(np.abs(total).sum(), golden[f"{name}:abs_sum"], rtol=1e-9,
                                   err_msg=name)


def test_smollm2_config(smollm2_path: str, smollm2_chat: dict) -> None:
    hf = load_hf_config(smollm2_path)
    for key, value in smollm2_chat["config"].items():
        assert hf[key] == value, key
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.eos_token_ids == (2,)
    gguf_info = gguf_file.read_gguf(smollm2_path)
    assert gguf_info.type_counts() == smollm2_chat["quant_types"]


@pytest.mark.parametrize("model_path", ["smollm2_path", "gemma3_path"])
def test_real_gguf_names_from_gguf_py_tables(model_path: str, request) -> None:
    """gguf-py's name table of the file's architecture (llama, gemma3) finds every parameter
    the config implies, each of the right shape, and uses every tensor of the file."""
    path = request.getfixturevalue(model_path)
    gguf_info = gguf_file.read_gguf(path)
    expected = expected_state_dict_shapes(ModelConfig.from_hf_config(load_hf_config(path)))
    names = gguf_file.gguf_tensor_names(gguf_info, expected)
    assert set(names) == set(expected)
    assert sorted(names.values()) == sorted(gguf_info.tensors)
    for hf_name, gguf_name in names.items():
        assert gguf_info.tensors[gguf_name].shape == expected[hf_name], hf_name


def test_smollm2_tokenizer_matches_transformers(smollm2_path: str, smollm2_chat: dict) -> None:
    tokenizer = load_tokenizer(smollm2_path)
    text = tokenizer.apply_chat_template(smollm2_chat["messages"], add_generation_prompt=True,
                                         tokenize=False)
    assert text == smollm2_chat["chat_text"]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == smollm2_chat["chat_ids"]
    for sample in smollm2_chat["tokenize_samples"]:
        assert tokenizer(sample["text"], add_special_tokens=False)["input_ids"] == sample["ids"]
    assert tokenizer.decode(smollm2_chat["greedy_ids"], skip_special_tokens=True) == \
        smollm2_chat["greedy_text"]


# --------------------------------------------------------------------------------------------
# HF directories


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_golden_loads(name: str) -> None:
    path = os.path.join(GOLDEN, name)
    cfg = ModelConfig.from_hf_config(load_hf_config(path))
    state = load_hf_state_dict(path, "bfloat16")
    expected = expected_state_dict_shapes(cfg)
    assert set(state) == set(expected)
    for key, shape in expected.items():
        assert state[key].shape == shape and state[key].dtype == ml_dtypes.bfloat16, key
    raw = load_file(os.path.join(path, "model.safetensors"))
    np.testing.assert_array_equal(state["model.norm.weight"],
                                  raw["model.norm.weight"].astype(ml_dtypes.bfloat16))


def test_golden_configs_cover_the_families() -> None:
    cfgs = {name: ModelConfig.from_hf_config(load_hf_config(os.path.join(GOLDEN, name)))
            for name in TINY_MODELS}
    assert cfgs["llama2"].num_kv_heads == cfgs["llama2"].num_heads
    assert cfgs["llama3"].rope_scaling["rope_type"] == "llama3"
    assert cfgs["llama3"].head_dim * cfgs["llama3"].num_heads != cfgs["llama3"].hidden_size
    assert cfgs["mistral"].architecture == "MistralForCausalLM"
    assert cfgs["qwen2"].attention_bias and cfgs["qwen2"].tie_word_embeddings
    assert cfgs["llama_tied_mqa"].num_kv_heads == 1 and cfgs["llama_tied_mqa"].tie_word_embeddings
    state = load_hf_state_dict(os.path.join(GOLDEN, "qwen2"), "float32")
    assert "model.layers.0.self_attn.q_proj.bias" in state
    assert "model.layers.0.self_attn.o_proj.bias" not in state and "lm_head.weight" not in state


def test_sharded_safetensors_round_trip(tmp_path) -> None:
    src = os.path.join(GOLDEN, "llama3")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(tmp_path / shard))
        weight_map.update({n: shard for n in shard_names})
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")

    sharded = load_hf_state_dict(str(tmp_path), "float32")
    single = load_hf_state_dict(src, np.float32)
    assert set(sharded) == set(single) == set(tensors)
    for name in tensors:
        np.testing.assert_array_equal(sharded[name], tensors[name])
        np.testing.assert_array_equal(single[name], tensors[name])
    # A config.json path works as well as its directory.
    via_config = load_hf_state_dict(str(tmp_path / "config.json"), "float16")
    assert via_config["model.norm.weight"].dtype == np.float16


def _golden_copy(tmp_path, name: str) -> tuple[str, dict[str, np.ndarray]]:
    shutil.copy(os.path.join(GOLDEN, name, "config.json"), tmp_path / "config.json")
    return str(tmp_path), load_file(os.path.join(GOLDEN, name, "model.safetensors"))


def test_missing_tensor_is_named(tmp_path) -> None:
    path, tensors = _golden_copy(tmp_path, "llama2")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"
                                         r".*\(128, 64\)"):
        load_hf_state_dict(path, "float32")


def test_misshaped_tensor_is_named(tmp_path) -> None:
    path, tensors = _golden_copy(tmp_path, "llama2")
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 64), np.float32)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight'.*"
                                         r"shape \(32, 64\); expected \(64, 64\)"):
        load_hf_state_dict(path, "float32")


def test_nonexistent_path(tmp_path) -> None:
    missing = str(tmp_path / "no-such-model")
    for load in (load_hf_config, lambda p: load_hf_state_dict(p, "float32"), load_tokenizer):
        with pytest.raises(ValueError, match=r"model path .*no-such-model.* does not exist"):
            load(missing)
    with pytest.raises(ValueError, match="no config.json and no .gguf"):
        load_hf_config(str(tmp_path))


def test_directory_without_tokenizer(tmp_path) -> None:
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer(os.path.join(GOLDEN, "llama2"))
    with pytest.raises(ValueError, match="tokenizer path .* does not exist"):
        load_tokenizer(os.path.join(GOLDEN, "llama2"), str(tmp_path / "nope"))


def test_unsupported_architecture(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"architectures \['BertForMaskedLM'\] not supported; "
                                         r"supported: LlamaForCausalLM, MistralForCausalLM, "
                                         r"Qwen2ForCausalLM, Qwen3ForCausalLM, GPT2LMHeadModel, "
                                         r"GPTNeoXForCausalLM, Gemma3ForCausalLM, BloomForCausalLM, "
                                         r"FalconForCausalLM"):
        resolve_architecture(["BertForMaskedLM"])
    assert resolve_architecture(["Foo", "Qwen2ForCausalLM"]) == "Qwen2ForCausalLM"
    assert resolve_architecture(["mistral"]) == "MistralForCausalLM"
    assert set(MODELS) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM",
                           "Gemma3ForCausalLM", "BloomForCausalLM", "FalconForCausalLM"}
    assert MODELS["Qwen3ForCausalLM"] is Qwen3ForCausalLM  # a class, not a name
    path, tensors = _golden_copy(tmp_path, "llama2")
    hf = load_hf_config(path)
    hf["architectures"] = ["BertForMaskedLM"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM"):
        load_hf_state_dict(path, "float32")


# --------------------------------------------------------------------------------------------
# GGUF files written here from the tiny goldens, the way llama.cpp's converter writes them


def _llamacpp_permute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`."""
    return (rows.reshape(n_heads, 2, rows.shape[0] // n_heads // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def _llama3_rope_freqs(hf: dict) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for llama3 rope scaling (convert_hf_to_gguf.py)."""
    rope = hf["rope_parameters"]
    dim = hf["head_dim"]
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = ((rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"])
                      / (rope["high_freq_factor"] - rope["low_freq_factor"]))
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _write_gguf(name: str, path: str, quantize: str | None = None) -> dict[str, np.ndarray]:
    """Write golden `name` as a GGUF file like llama.cpp does; returns the HF tensors written.

    With `quantize="gate"` the ffn_gate weights are stored as Q8_0.
    """
    hf = load_hf_config(os.path.join(GOLDEN, name))
    tensors = load_file(os.path.join(GOLDEN, name, "model.safetensors"))
    arch = hf["model_type"] if hf["model_type"] == "qwen2" else "llama"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny {name}")
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf["num_key_value_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(hf["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    writer.add_vocab_size(hf["vocab_size"])
    writer.add_bos_token_id(hf["bos_token_id"])
    writer.add_eos_token_id(hf["eos_token_id"])
    if hf["rope_parameters"].get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_freqs(hf))
    for hf_name, value in tensors.items():
        if hf_name == "lm_head.weight" and hf.get("tie_word_embeddings"):
            continue
        parts = hf_name.split(".")
        if parts[0] == "lm_head":
            gguf_name = "output." + parts[-1]
        elif parts[1] == "embed_tokens":
            gguf_name = "token_embd.weight"
        elif parts[1] == "norm":
            gguf_name = "output_norm.weight"
        else:
            gguf_name = f"blk.{parts[2]}.{_TO_GGUF['.'.join(parts[3:-1])]}.{parts[-1]}"
        if arch == "llama" and ".attn_q." in gguf_name:
            value = _llamacpp_permute(value, hf["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in gguf_name:
            value = _llamacpp_permute(value, hf["num_key_value_heads"])
        if quantize == "gate" and ".ffn_gate." in gguf_name:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
            tensors[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
        else:
            writer.add_tensor(gguf_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.mark.parametrize("name", ["llama3", "qwen2", "llama_tied_mqa"])
def test_gguf_round_trip(tmp_path, name: str) -> None:
    path = str(tmp_path / f"{name}.gguf")
    tensors = _write_gguf(name, path, quantize="gate" if name == "llama3" else None)
    hf_golden = load_hf_config(os.path.join(GOLDEN, name))
    cfg_golden = ModelConfig.from_hf_config(hf_golden)
    cfg = ModelConfig.from_hf_config(load_hf_config(path))
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "head_dim", "rope_theta", "max_position_embeddings",
                  "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_ids"):
        assert getattr(cfg, field) == getattr(cfg_golden, field), field
    assert cfg.rms_norm_eps == pytest.approx(cfg_golden.rms_norm_eps)
    if cfg_golden.rope_scaling is None:
        assert cfg.rope_scaling is None
    else:
        for key in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings"):
            assert cfg.rope_scaling[key] == pytest.approx(cfg_golden.rope_scaling[key]), key

    state = load_hf_state_dict(str(tmp_path), "float32")  # a directory with one .gguf works too
    assert set(state) == set(expected_state_dict_shapes(cfg_golden))
    for key, value in state.items():
        np.testing.assert_array_equal(value, tensors[key], err_msg=key)


def test_gguf_tensors_are_dequantized_when_looked_up(tmp_path, monkeypatch) -> None:
    """Opening a GGUF checks every tensor's shape from the header but dequantizes none (the
    loader streams one parameter at a time); a lookup dequantizes that tensor alone."""
    path = str(tmp_path / "llama3.gguf")
    tensors = _write_gguf("llama3", path, quantize="gate")
    read = []
    dequantize = gguf_file.GGUFFile.tensor
    monkeypatch.setattr(gguf_file.GGUFFile, "tensor",
                        lambda self, name: read.append(name) or dequantize(self, name))
    state = open_hf_state_dict(path, "float32")
    assert set(read) <= {"rope_freqs.weight"}  # the config's llama3 rope scaling
    assert set(state) == set(tensors)
    read.clear()
    name = "model.layers.1.mlp.gate_proj.weight"
    np.testing.assert_array_equal(state[name], tensors[name])
    assert read == ["blk.1.ffn_gate.weight"]


def test_unpermute_inverts_llamacpp_permute() -> None:
    rng = np.random.default_rng(0)
    for n_heads, head_dim in ((4, 16), (3, 64), (1, 8)):
        w = rng.standard_normal((n_heads * head_dim, 24)).astype(np.float32)
        b = rng.standard_normal(n_heads * head_dim).astype(np.float32)
        np.testing.assert_array_equal(
            gguf_file.unpermute_qk(_llamacpp_permute(w, n_heads), n_heads), w)
        np.testing.assert_array_equal(
            gguf_file.unpermute_qk(_llamacpp_permute(b, n_heads), n_heads), b)


def _write_tensors(path: str, arch: str, tensors: dict[str, np.ndarray],
                   raw_types: dict[str, gguf.GGMLQuantizationType] | None = None) -> None:
    """A GGUF of architecture `arch` holding `tensors`; those named in `raw_types` are raw bytes
    [rows, bytes per row] of that ggml type."""
    writer = gguf.GGUFWriter(path, arch)
    for name, value in tensors.items():
        writer.add_tensor(name, value, raw_dtype=(raw_types or {}).get(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # random fp16 scales: NaN, inf
def test_dequantized_in_runs_of_blocks_as_gguf_py_does_whole(tmp_path, monkeypatch,
                                                              qtype: str) -> None:
    """Tensors go through gguf-py's dequantizer in flat runs of blocks; runs that end mid-row
    change no bit of the result."""
    qtype = gguf.GGMLQuantizationType[qtype]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 6, 3
    raw = np.random.default_rng(int(qtype)).integers(0, 256, (rows, blocks_per_row * type_size),
                                                     dtype=np.uint8)
    path = str(tmp_path / "one.gguf")
    _write_tensors(path, "llama", {"t": raw}, {"t": qtype})
    monkeypatch.setattr(gguf_file, "_VALUES_PER_CALL", 4 * block_size)
    values = gguf_file.read_gguf(path).tensor("t")
    assert values.dtype == np.float32 and values.shape == (rows, blocks_per_row * block_size)
    np.testing.assert_array_equal(values, gguf.quants.dequantize(raw, qtype))


def test_gguf_errors_name_the_file_and_the_type(tmp_path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    with pytest.raises(ValueError, match=r"model file .*model\.gguf is not a GGUF file"):
        load_hf_config(str(not_gguf))

    path = str(tmp_path / "odd.gguf")
    _write_tensors(path, "bert", {"ints": np.arange(32, dtype=np.int8),
                                  "unknown": np.zeros(32, np.float32)})
    with open(path, "r+b") as f:  # give tensor "unknown" a ggml type id gguf-py does not know
        header = f.read(4096)
        f.seek(header.index(b"unknown") + len(b"unknown") + 4 + 8)  # past n_dims and one dim
        f.write((99).to_bytes(4, "little"))
    with pytest.raises(ValueError, match=r"GGUF architecture 'bert' is not supported; "
                                         r"supported: gemma3, llama, qwen2"):
        load_hf_config(path)
    odd = gguf_file.read_gguf(path)
    assert odd.type_counts() == {"I8": 1, "type 99": 1}
    with pytest.raises(ValueError, match=r"'ints' in .*odd\.gguf is of ggml type I8, which "
                                         r"gguf-py cannot dequantize"):
        odd.tensor("ints")
    with pytest.raises(ValueError, match=r"'unknown' .* is of ggml type type 99"):
        odd.tensor("unknown")


def test_sliding_window_layers_from_the_config():
    """Which layers are windowed: transformers' layer_types, else every layer (Mistral), else
    (older Qwen2 configs) the layers from max_window_layers on; use_sliding_window=False none."""
    with open(os.path.join(GOLDEN, "qwen2", "config.json")) as f:
        base = json.load(f)
    base.pop("layer_types", None)
    base.pop("use_sliding_window")  # transformers' default: True

    def windows(**fields):
        cfg = ModelConfig.from_hf_config({**base, **fields})
        return [cfg.layer_window(i) for i in range(cfg.num_layers)]

    assert windows(sliding_window=8, max_window_layers=1) == [None, 8]
    assert windows(sliding_window=8, use_sliding_window=False) == [None, None]
    assert windows(sliding_window=8, layer_types=["sliding_attention", "full_attention"]) == [8, None]
    assert windows(architectures=["MistralForCausalLM"], sliding_window=8) == [8, 8]
    with pytest.raises(ValueError, match="layer_types"):
        windows(sliding_window=8, layer_types=["full_attention"])


def test_a_checkpoint_of_the_bare_model_loads(tmp_path) -> None:
    """GPT-2's hub checkpoints were saved from the bare model (`h.0.attn...`, no
    `transformer.`): the loader finds each tensor under either name, as transformers does."""
    path, tensors = _golden_copy(tmp_path, "gpt2")
    save_file({name.removeprefix("transformer."): value for name, value in tensors.items()},
              os.path.join(path, "model.safetensors"))
    loaded = load_hf_state_dict(path, "float32")
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_falcon_variants_from_the_config():
    """Falcon's KV heads and LayerNorms follow multi_query / new_decoder_architecture; alibi
    (Falcon-RW) replaces rotary with ALiBi, which BLOOM always has; cascade attention serves
    neither."""
    with open(os.path.join(GOLDEN, "falcon_mqa", "config.json")) as f:
        base = json.load(f)
    for fields, kv_heads, norms in (({"multi_query": True}, 1, 1),
                                    ({"multi_query": False}, 4, 1),
                                    ({"new_decoder_architecture": True, "num_kv_heads": 2}, 2, 2)):
        cfg = ModelConfig.from_hf_config({**base, **fields})
        assert (cfg.num_kv_heads, cfg.parallel_norms) == (kv_heads, norms)
    assert base.get("alibi") is False and ModelConfig.from_hf_config(base).has_full_causal_layers
    rw = ModelConfig.from_hf_config({**base, "alibi": True})
    assert rw.alibi and not rw.has_full_causal_layers
    with open(os.path.join(GOLDEN, "bloom", "config.json")) as f:
        assert ModelConfig.from_hf_config(json.load(f)).alibi


def test_generation_config_eos_ids_end_generation_too(tmp_path) -> None:
    """A chat model's end-of-turn token listed in generation_config.json stops generation as
    its config.json's EOS does."""
    path, _ = _golden_copy(tmp_path, "llama2")
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 7]}, f)
    assert ModelConfig.from_hf_config(load_hf_config(path)).eos_token_ids == (2, 7)


def test_gemma3_layer_types_from_the_older_pattern_field():
    """A Gemma 3 config.json without layer_types (as the released ones were written) makes every
    sliding_window_pattern-th layer global, transformers' rule, not every layer windowed."""
    with open(os.path.join(GOLDEN, "gemma3", "config.json")) as f:
        base = json.load(f)
    del base["layer_types"]
    for fields, globals_at in (({"num_hidden_layers": 12}, (5, 11)),
                               ({"num_hidden_layers": 5, "sliding_window_pattern": 2}, (1, 3))):
        cfg = ModelConfig.from_hf_config({**base, **fields})
        assert [i for i in range(cfg.num_layers) if cfg.layer_window(i) is None] == list(globals_at)
        assert cfg.layer_window(0) == base["sliding_window"]


def test_context_length_under_linear_rope_scaling():
    """Linear rope scaling stretches a Llama config's max_position_embeddings; Gemma 3's configs
    state the stretched length already (131,072 positions with factor 8), as vLLM reads them."""
    scaling = {"rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    for name, expected in (("llama2", 8 * 256), ("gemma3", 256)):
        with open(os.path.join(GOLDEN, name, "config.json")) as f:
            hf = {**json.load(f), "max_position_embeddings": 256, **scaling}
        hf.pop("rope_parameters", None)
        assert ModelConfig.from_hf_config(hf).max_context_len == expected
