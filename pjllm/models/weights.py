"""Loading configs, weights and tokenizers from HF checkpoint directories and GGUF files.

Whatever the source, the result is in HF-transformers terms, so the model code has one input
format:
- `load_hf_config(path)` -> the dict of an HF `config.json` (for `ModelConfig.from_hf_config`);
- `open_hf_state_dict(path, dtype)` -> a mapping of numpy arrays named and shaped like the
  transformers state dict of the model's family (`model.layers.0.self_attn.q_proj.weight` is
  [out, in]), checked against the config: exactly the tensors the config implies, each of the
  right shape. Each tensor is read when it is looked up, so a loader holds one at a time;
  `load_hf_state_dict(path, dtype)` reads them all into a dict;
- `load_tokenizer(path)` -> a transformers fast tokenizer, with the chat template.

`path` is an HF directory (config.json + *.safetensors, sharded or not), a `config.json` inside one,
or a `.gguf` file (quantized tensors are dequantized at load; see `pjllm.models.gguf_file`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import ml_dtypes
import numpy as np

from pjllm.config import ModelConfig

# pjllm uses transformers for tokenizers only; its import-time advice that torch is missing
# would greet every user of the CLI.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a checkpoint lives: an HF directory, or a single GGUF file."""

    kind: Literal["hf", "gguf"]
    path: str


def resolve_model_source(path: str, field: str = "model") -> ModelSource:
    """Classify `path` as an HF directory or a GGUF file.

    `field` names the user-facing setting in error messages ("model" or "tokenizer").
    Raises ValueError for a path that does not exist or holds no checkpoint.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"{field} must be a path to an HF directory, a .gguf file or a config.json; "
                         f"got {path!r}")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise ValueError(f"{field} path {path!r} does not exist")
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return ModelSource("gguf", path)
        if path.endswith(".json"):
            return ModelSource("hf", os.path.dirname(os.path.abspath(path)))
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return ModelSource("gguf", path)
        raise ValueError(f"{field} path {path!r} is neither a .gguf file nor a config.json")
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelSource("hf", path)
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0])
    if ggufs:
        raise ValueError(f"{field} directory {path!r} holds several .gguf files; pass one of "
                         f"{[os.path.basename(g) for g in ggufs]}")
    raise ValueError(f"{field} directory {path!r} has no config.json and no .gguf file")


def numpy_dtype(dtype: Any) -> np.dtype:
    """np.dtype for "bfloat16" (ml_dtypes), "float16", "float32", or anything np.dtype accepts."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def load_hf_config(model_path: str) -> dict[str, Any]:
    """The HF `config.json` dict of an HF directory / config.json, or one built from GGUF metadata
    (its eos_token_id joined by generation_config.json's, or the file's end-of-turn token)."""
    source = resolve_model_source(model_path)
    if source.kind == "gguf":
        from pjllm.models import gguf_file  # gguf-py is needed for GGUF files only

        return gguf_file.gguf_to_hf_config(gguf_file.read_gguf(source.path))
    config_file = model_path if os.path.isfile(model_path) else os.path.join(source.path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    # End of generation as the model defines it: generation_config.json's EOS ids too (chat
    # models list their end-of-turn token there, as Llama 3's <|eot_id|>), as vLLM does.
    generation_path = os.path.join(source.path, "generation_config.json")
    if os.path.exists(generation_path):
        with open(generation_path) as f:
            generation_eos = json.load(f).get("eos_token_id")
        eos = [*_as_list(config.get("eos_token_id")), *_as_list(generation_eos)]
        if eos:
            config["eos_token_id"] = list(dict.fromkeys(eos))
    return config


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


# generation_config.json fields that become default sampling parameters (vLLM's set), by the
# SamplingParams field they set.
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                       "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                       "max_new_tokens": "max_tokens"}


def load_generation_defaults(model_path: str) -> dict[str, Any]:
    """The model's recommended sampling settings from its `generation_config.json` (an HF
    directory's; a GGUF file or a bare config.json has none), as SamplingParams fields."""
    source = resolve_model_source(model_path)
    if source.kind == "gguf":
        return {}
    path = os.path.join(source.path, "generation_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        generation = json.load(f)
    return {field: generation[key] for key, field in GENERATION_DEFAULTS.items()
            if generation.get(key) is not None}


def expected_state_dict_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the transformers checkpoint for `cfg`, with its shape (its family's
    `checkpoint_shapes`)."""
    from pjllm.models.registry import model_class

    return model_class(cfg.architecture).checkpoint_shapes(cfg)


def _check_shapes(available: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                  where: str) -> None:
    """Raise ValueError naming the first expected tensor that is missing or misshaped."""
    for name, shape in expected.items():
        if name not in available:
            raise ValueError(f"checkpoint {where} is missing tensor {name!r} "
                             f"(expected shape {shape} from the config)")
        if tuple(available[name]) != shape:
            raise ValueError(f"tensor {name!r} in {where} has shape {tuple(available[name])}; "
                             f"expected {shape} from the config")


def _safetensors_files(directory: str) -> list[str]:
    index_path = os.path.join(directory, _SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ValueError(f"model directory {directory!r} has no *.safetensors files")
    return files


class CheckpointTensors(Mapping[str, np.ndarray]):
    """A checkpoint's tensors by transformers name. Looking one up reads it from the file
    (dequantized and cast as the reader does); nothing is cached, so a caller that drops each
    array before looking up the next holds one tensor's memory, not the checkpoint's.
    `shapes` gives every tensor's shape without reading it."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], read: Callable[[str], np.ndarray]):
        self.shapes = shapes
        self._read = read

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _open_safetensors(directory: str, expected: dict[str, tuple[int, ...]], dtype: np.dtype,
                      base_model_prefix: str) -> CheckpointTensors:
    """The `expected` tensors of an HF directory, each read with `safe_open` when looked up. A
    checkpoint saved from the bare model (GPT-2's hub files: `h.0.attn...`) names them without
    `base_model_prefix.`, as transformers allows."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, tuple[str, str]] = {}  # expected name -> (file, name in the file)
    for path in _safetensors_files(directory):
        with safe_open(path, framework="numpy") as f:
            for stored in f.keys():
                name = stored if stored in expected else f"{base_model_prefix}.{stored}"
                if name in expected and name not in where:
                    shapes[name] = tuple(f.get_slice(stored).get_shape())
                    where[name] = (path, stored)
    _check_shapes(shapes, expected, directory)

    def read(name: str) -> np.ndarray:
        path, stored = where[name]
        with safe_open(path, framework="numpy") as f:
            return f.get_tensor(stored).astype(dtype, copy=False)

    return CheckpointTensors(dict(expected), read)


def open_hf_state_dict(model_path: str, dtype: Any = "float32") -> CheckpointTensors:
    """The checkpoint's weights as a transformers-style state dict, each tensor read (a GGUF
    one dequantized) into a numpy array in `dtype` when it is looked up.

    Holds exactly the tensors the config implies (see `expected_state_dict_shapes`); extra
    tensors in the checkpoint (e.g. `lm_head.weight` of a tied model) are ignored.
    Raises ValueError for a nonexistent path, or a missing or misshaped tensor (checked from
    the file's header, before any tensor is read).
    """
    source = resolve_model_source(model_path)
    dt = numpy_dtype(dtype)
    hf_config = load_hf_config(source.path)
    cfg = ModelConfig.from_hf_config(hf_config)
    expected = expected_state_dict_shapes(cfg)
    if source.kind == "hf":
        from pjllm.models.registry import model_class

        return _open_safetensors(source.path, expected, dt,
                                 model_class(cfg.architecture).base_model_prefix)
    from pjllm.models import gguf_file

    gguf = gguf_file.read_gguf(source.path)
    gguf_names = gguf_file.gguf_tensor_names(gguf, expected)
    _check_shapes({name: gguf.tensors[gguf_name].shape for name, gguf_name in gguf_names.items()},
                  expected, source.path)
    return CheckpointTensors(dict(expected), lambda name: gguf_file.gguf_hf_tensor(
        gguf, name, gguf_names[name], hf_config, dt))


def load_hf_state_dict(model_path: str, dtype: Any = "float32") -> dict[str, np.ndarray]:
    """Every tensor of `open_hf_state_dict(model_path, dtype)` read into one dict (the whole
    checkpoint in host memory: for inspection and tests; the loader streams instead)."""
    return dict(open_hf_state_dict(model_path, dtype))


def load_tokenizer(model_path: str, tokenizer_path: str | None = None) -> Any:
    """A transformers fast tokenizer (with chat template) for the model.

    From `tokenizer_path` when given, else from the model: an HF directory's tokenizer files, or a
    GGUF file's tokenizer metadata. Raises ValueError when there is no tokenizer to be found.
    """
    field = "tokenizer" if tokenizer_path is not None else "model"
    source = resolve_model_source(tokenizer_path if tokenizer_path is not None else model_path, field)
    if source.kind == "gguf":
        from pjllm.models import gguf_file

        return gguf_file.gguf_tokenizer(gguf_file.read_gguf(source.path))
    if not any(os.path.isfile(os.path.join(source.path, name)) for name in _TOKENIZER_FILES):
        raise ValueError(f"{field} directory {source.path!r} has no tokenizer files "
                         f"({', '.join(_TOKENIZER_FILES)}); pass tokenizer=<HF directory or .gguf>")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path)
