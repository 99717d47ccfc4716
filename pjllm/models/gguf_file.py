"""Reading GGUF files (llama.cpp's model format) into HF-transformers terms.

A GGUF holds its config and tokenizer as metadata under llama.cpp's key names and its weights
under llama.cpp's tensor names, quantized in ggml block formats. This module turns those into
what the rest of pjllm reads from an HF checkpoint: a `config.json`-style dict, and a state dict
named and laid out like transformers' Llama/Mistral/Qwen2/Gemma 3 models.

gguf-py (the `gguf` package, kept by llama.cpp's authors) supplies the format's constants, the
dequantizers (`gguf.quants.dequantize`, called on flat runs of blocks: see _VALUES_PER_CALL) and
the GGUF name of each HF tensor name per architecture (`gguf.get_tensor_name_map`). The header is
parsed here: `gguf.GGUFReader` makes a numpy view of every element of every metadata array, and
on the vocabularies of real files took 27x (SmolLM2, 49k tokens) and 49x (Gemma 3, 262k tokens)
as long as this parser (docs/architecture.md has the numbers).

What llama.cpp's converter changes besides names is undone here:
- For the `llama` architecture (which Mistral files use too), the rows of q_proj and k_proj (and
  their biases) are permuted from HF's half-split rotary layout to interleaved pairs; we apply the
  inverse permutation, as transformers' GGUF loader does. `qwen2` files are not permuted.
- Llama 3.x rope scaling is stored as a precomputed `rope_freqs.weight` tensor of per-frequency
  divisors rather than as config values; we fit the `llama3` rope_scaling parameters back from it.
- Gemma 3's norm weights are stored as 1 + weight, and its layer pattern and local rotary base are
  not stored at all (llama.cpp hardcodes them).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import struct
from typing import Any, Iterable

import numpy as np
from gguf.constants import (GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC,
                            MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFValueType)
from gguf.quants import dequantize
from gguf.tensor_mapping import get_tensor_name_map

logger = logging.getLogger(__name__)

# The GGUF versions whose header layout the parser below reads.
_SUPPORTED_VERSIONS = (2, 3)
# Little-endian struct formats of the fixed-size metadata value types (strings and arrays are
# length-prefixed, read by _Cursor.value).
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT32: "<f",
    GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
}

# general.architecture -> (HF architecture, HF model_type).
GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
# llama.cpp writes Mistral models as `llama`; transformers maps them back by general.name.
_MISTRAL = ("MistralForCausalLM", "mistral")
# Architectures whose q/k rows llama.cpp's converter permutes.
_PERMUTED_QK_ARCHITECTURES = ("llama",)
# Architectures whose norm weights llama.cpp's converter stores as 1 + weight (Gemma's RMSNorm
# multiplies by 1 + weight; transformers keeps the weight).
_UNIT_OFFSET_NORM_ARCHITECTURES = ("gemma3",)
# Gemma 3: every sixth layer is global, the rest local (transformers' sliding_window_pattern;
# llama.cpp hardcodes it too, as it does the local layers' rotary base, which the family's
# config defaults supply here).
_GEMMA3_GLOBAL_EVERY = 6
# gguf-py dequantizes an array 16 rows per step, and rows of a few hundred values (SmolLM2's 576,
# Gemma 3 270M's 640) make its per-step overhead most of the cost. Block formats ignore rows, so
# we pass it flat runs of this many values instead (1 MiB of float32, so its temporaries stay in
# cache): faster than whole tensors, and than runs 8x as long (docs/architecture.md).
_VALUES_PER_CALL = 1 << 18


def _ggml_type_name(type_id: int) -> str:
    """`Q4_K` for 12; `type 99` for an id gguf-py does not know."""
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of a GGUF tensor table. `shape` is in numpy order (ggml's dims reversed)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int  # a GGMLQuantizationType value, or an id gguf-py does not know
    offset: int  # absolute byte offset in the file


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF header: metadata, tensor table, and a read-only memory map of the file."""

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    data: np.ndarray  # uint8 memmap of the whole file

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def tensor(self, name: str) -> np.ndarray:
        """Tensor `name`, dequantized to float32, in numpy order ([out, in] for a weight).

        Raises ValueError for a ggml type gguf-py cannot dequantize, or a truncated file.
        """
        info = self.tensors[name]
        try:
            qtype = GGMLQuantizationType(info.ggml_type)
        except ValueError:
            raise self._cannot_dequantize(info) from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if info.shape and info.shape[-1] % block_size:
            raise ValueError(f"tensor {name!r} in {self.path}: {qtype.name} rows must be a "
                             f"multiple of {block_size} values; got shape {info.shape}")
        n_blocks = math.prod(info.shape) // block_size
        raw = self.data[info.offset:info.offset + n_blocks * type_size]
        if raw.size != n_blocks * type_size:
            raise ValueError(f"tensor {name!r} runs past the end of {self.path} (truncated file?)")
        values = np.empty(n_blocks * block_size, np.float32)
        blocks_per_call = max(1, _VALUES_PER_CALL // block_size)
        try:
            for start in range(0, n_blocks, blocks_per_call):
                stop = min(start + blocks_per_call, n_blocks)
                values[start * block_size:stop * block_size] = dequantize(
                    raw[start * type_size:stop * type_size], qtype)
        except NotImplementedError:  # gguf-py knows the type but has no dequantizer for it
            raise self._cannot_dequantize(info) from None
        return values.reshape(info.shape)

    def _cannot_dequantize(self, info: GGUFTensorInfo) -> ValueError:
        return ValueError(f"tensor {info.name!r} in {self.path} is of ggml type "
                          f"{_ggml_type_name(info.ggml_type)}, which gguf-py cannot dequantize")

    def type_counts(self) -> dict[str, int]:
        """How many tensors of each ggml type the file holds, e.g. {"Q4_1": 210, "F32": 61}."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            name = _ggml_type_name(info.ggml_type)
            counts[name] = counts.get(name, 0) + 1
        return counts


class _Cursor:
    """Sequential little-endian reads over a byte buffer: a memoryview of the file's memory map,
    which slices several times faster than the numpy memmap (a vocabulary is one string each)."""

    def __init__(self, buf: memoryview, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def unpack(self, fmt: str) -> Any:
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.unpack("<Q")
        start = self.pos
        self.pos += length
        return bytes(self.buf[start:self.pos]).decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type])
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            item_type, count = self.unpack("<IQ")
            if item_type in _SCALAR_FORMATS:
                # One numpy read for the whole array, rather than one unpack per item.
                dtype = np.dtype(_SCALAR_FORMATS[item_type])
                end = self.pos + count * dtype.itemsize
                values = np.frombuffer(self.buf[self.pos:end].tobytes(), dtype=dtype).tolist()
                self.pos = end
                return values
            if item_type == GGUFValueType.STRING:  # the vocabulary: up to hundreds of thousands
                return [self.string() for _ in range(count)]
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"unknown GGUF metadata value type {value_type}")


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor table; tensor data stays memory-mapped.

    Parsed headers are cached per (path, size, mtime). Raises ValueError if the file is not a
    GGUF v2/v3 file.
    """
    stat = os.stat(path)
    return _read_gguf(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_gguf(path: str, size: int, mtime_ns: int) -> GGUFFile:
    del size, mtime_ns  # cache key only
    data = np.memmap(path, mode="r", dtype=np.uint8)
    if data.size < 4 or struct.unpack_from("<I", data)[0] != GGUF_MAGIC:
        raise ValueError(f"model file {path} is not a GGUF file (bad magic bytes)")
    cur = _Cursor(memoryview(data), 4)
    version, tensor_count, kv_count = cur.unpack("<IQQ")
    if version not in _SUPPORTED_VERSIONS:
        raise ValueError(f"model file {path} is GGUF version {version}; supported: "
                         f"{', '.join(map(str, _SUPPORTED_VERSIONS))}")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    entries = []
    for _ in range(tensor_count):
        name = cur.string()
        n_dims = cur.unpack("<I")
        dims = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
        cur.pos += 8 * n_dims
        ggml_type, offset = cur.unpack("<IQ")
        entries.append((name, tuple(int(d) for d in reversed(dims)), ggml_type, offset))
    alignment = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors = {name: GGUFTensorInfo(name, shape, ggml_type, data_start + offset)
               for name, shape, ggml_type, offset in entries}
    return GGUFFile(path, metadata, tensors, data)


# ---------------------------------------------------------------------------------------------
# Config


def _llama3_rope_scaling(rope_factors: np.ndarray, head_dim: int, rope_theta: float) -> dict[str, Any]:
    """Recover HF `llama3` rope_scaling from llama.cpp's `rope_freqs` divisors.

    llama.cpp stores f_i per frequency: 1 for wavelengths below original_len / high_freq_factor,
    `factor` above original_len / low_freq_factor, and 1 / ((1 - s) / factor + s) in between, with
    s = (original_len / wavelen - low) / (high - low). In the ramp s is linear in 1 / wavelen, which
    fixes original_len / (high - low) and low / (high - low); we take low_freq_factor = 1 (every
    released Llama 3.x) to pin the rest. The rotary frequencies come out the same either way.
    """
    factors = rope_factors.astype(np.float64).reshape(-1)
    factor = float(factors.max())
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq[: factors.size]
    ramp = (factors > 1.0 + 1e-6) & (factors < factor * (1 - 1e-6))
    scaling: dict[str, Any] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if factor <= 1.0:
        return scaling
    if ramp.sum() >= 2:
        s = (1.0 / factors[ramp] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(1.0 / wavelen[ramp], s, 1)  # s = slope / wavelen + intercept
        original = -slope / intercept  # with low_freq_factor = 1
        scaling["original_max_position_embeddings"] = int(round(original))
        scaling["high_freq_factor"] = float(round(1.0 + original / slope, 6))
    else:
        logger.warning("rope_freqs has too few ramp values to recover llama3 rope scaling exactly; "
                       "assuming original_max_position_embeddings=8192, low/high factors 1/4")
    return scaling


def _check_architecture(gguf: GGUFFile) -> str:
    """The file's architecture, if pjllm reads it (GGUF_ARCHITECTURES); else ValueError."""
    arch = gguf.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(sorted(GGUF_ARCHITECTURES))}")
    return arch


def gguf_to_hf_config(gguf: GGUFFile) -> dict[str, Any]:
    """An HF `config.json` dict for a GGUF file of a supported architecture (GGUF_ARCHITECTURES).

    Raises ValueError for an architecture pjllm does not read from GGUF.
    """
    md = gguf.metadata
    arch = _check_architecture(gguf)
    hf_arch, model_type = GGUF_ARCHITECTURES[arch]
    if arch == "llama" and "mistral" in str(md.get("general.name", "")).lower():
        hf_arch, model_type = _MISTRAL

    def key(name: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{name}", default)

    tokens = md.get("tokenizer.ggml.tokens")
    vocab_size = key("vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab_size is None and "token_embd.weight" in gguf.tensors:
        vocab_size = gguf.tensors["token_embd.weight"].shape[0]
    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    num_kv_heads = key("attention.head_count_kv", num_heads)
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // num_heads
    rope_theta = float(key("rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(key("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "hidden_act": "silu",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in gguf.tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in gguf.tensors
    if arch == "gemma3":  # (the family turns the pattern into layer_types)
        config.update(
            query_pre_attn_scalar=int(head_dim),
            sliding_window=int(key("attention.sliding_window")),
            sliding_window_pattern=_GEMMA3_GLOBAL_EVERY)
        del config["hidden_act"]
    scaling_type = key("rope.scaling.type")
    if scaling_type in ("linear", "yarn"):
        scaling = {"rope_type": scaling_type, "factor": float(key("rope.scaling.factor", 1.0))}
        original = key("rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        config["rope_scaling"] = scaling
    elif "rope_freqs.weight" in gguf.tensors:
        config["rope_scaling"] = _llama3_rope_scaling(gguf.tensor("rope_freqs.weight"),
                                                      int(head_dim), rope_theta)
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in md:
            config[hf_key] = int(md[f"tokenizer.ggml.{gguf_key}"])
    # llama.cpp stops generation at eos and at eot (end of turn) when the file names one, and
    # at Gemma's <end_of_turn>, which chat turns end with.
    eos_ids = [int(md[f"tokenizer.ggml.{k}"]) for k in ("eos_token_id", "eot_token_id")
               if f"tokenizer.ggml.{k}" in md]
    if arch == "gemma3" and tokens is not None and "<end_of_turn>" in tokens:
        eos_ids.append(tokens.index("<end_of_turn>"))
    eos_ids = list(dict.fromkeys(eos_ids))
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    return config


# ---------------------------------------------------------------------------------------------
# Weights


def gguf_tensor_names(gguf: GGUFFile, hf_names: Iterable[str]) -> dict[str, str]:
    """The GGUF name of each of `hf_names` that the file holds (`model.layers.0.self_attn.q_proj.
    weight` -> `blk.0.attn_q.weight`), by gguf-py's table for the file's architecture; names the
    file lacks are left out (the caller reports them)."""
    arch = _check_architecture(gguf)
    model_arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == arch)
    name_map = get_tensor_name_map(model_arch, int(gguf.metadata[f"{arch}.block_count"]))
    names = {}
    for hf_name in hf_names:
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name in gguf.tensors:
            names[hf_name] = gguf_name
    return names


def unpermute_qk(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (`LlamaModel.permute` in convert_hf_to_gguf.py).

    Within each head llama.cpp reorders rows from HF's [first half | second half] rotary layout
    to interleaved pairs: it views the rows as [heads, 2, head_dim / 2] and swaps the last two
    axes. This views them as [heads, head_dim / 2, 2] and swaps back. Works on a weight [rows, in]
    and on a bias [rows].
    """
    head_dim = rows.shape[0] // n_heads
    return (rows.reshape(n_heads, head_dim // 2, 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def gguf_hf_tensor(gguf: GGUFFile, name: str, gguf_name: str, config: dict[str, Any],
                   dtype: np.dtype) -> np.ndarray:
    """HF tensor `name` from the file's `gguf_name` (from `gguf_tensor_names`), dequantized,
    laid out as transformers' (e.g. [out, in] for a weight) and cast to `dtype`."""
    values = gguf.tensor(gguf_name)
    if gguf.architecture in _UNIT_OFFSET_NORM_ARCHITECTURES and name.endswith("norm.weight"):
        values = values - 1.0
    if gguf.architecture in _PERMUTED_QK_ARCHITECTURES:
        if ".self_attn.q_proj." in name:
            values = unpermute_qk(values, config["num_attention_heads"])
        elif ".self_attn.k_proj." in name:
            values = unpermute_qk(values, config["num_key_value_heads"])
    return values.astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# Tokenizer

_SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def gguf_tokenizer(gguf: GGUFFile) -> Any:
    """A transformers fast tokenizer built from the GGUF's tokenizer metadata and chat template.

    Built the way `AutoTokenizer.from_pretrained(dir, gguf_file=...)` builds it (its metadata
    reader needs torch, so we read the metadata ourselves and reuse its converter).
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

    md = gguf.metadata
    if "tokenizer.ggml.tokens" not in md:
        raise ValueError(f"GGUF file {gguf.path} has no tokenizer metadata; pass a tokenizer path")
    groups = {
        group: {name: md[f"tokenizer.{key}"] for key, name in renames.items()
                if f"tokenizer.{key}" in md}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)  # sentencepiece files default to BOS
    tokens = tokenizer_dict["tokens"]
    for name, key in _SPECIAL_TOKEN_KEYS.items():
        token_id = md.get(key)
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(gguf.architecture, tokenizer_dict)
    tokenizer_config.update(extra)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)
