"""pjllm's own checkpoint: a model's parameters in orbax-checkpoint's format, restored straight
onto a mesh.

`pjllm convert MODEL OUT --format orbax` writes OUT as an HF-style directory (config.json,
generation_config.json and the tokenizer files, so everything that reads a model directory reads
it) whose weights are the engine's own parameter tree under `OUT/params` (orbax's
StandardCheckpointer), already fused and transposed. `LLM(model=OUT)` restores that tree with
each array's target sharding, so every device reads only its own slices of the files.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

PARAMS_DIR = "params"
_COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "chat_template.jinja")


def is_orbax_checkpoint(path: str) -> bool:
    """Whether `path` is a directory `convert_to_orbax` wrote."""
    return os.path.isdir(os.path.join(path, PARAMS_DIR)) and os.path.isfile(
        os.path.join(path, "config.json"))


def convert_to_orbax(model: str, out: str, dtype: str = "auto") -> str:
    """Writes model `model` (an HF directory or a GGUF file) to `out` in pjllm's orbax format,
    its parameters in `dtype` ("auto": bfloat16, "float32", ...). Returns `out`.

    Raises ValueError if `out` exists and is not empty.
    """
    import orbax.checkpoint as ocp

    from pjllm.config import ModelConfig
    from pjllm.models.loader import build_model
    from pjllm.models.weights import load_hf_config, load_tokenizer, resolve_model_source

    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"output directory {out!r} exists and is not empty")
    source = resolve_model_source(model)
    hf_config = load_hf_config(model)
    config = ModelConfig.from_hf_config(hf_config)
    weights_dtype = jnp.bfloat16 if dtype == "auto" else jnp.dtype(dtype)
    _, state = build_model(config, weights_dtype, source.kind if source.kind == "gguf"
                           else "safetensors", model)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1)
    if source.kind == "gguf":
        load_tokenizer(model).save_pretrained(out)
    else:
        for name in _COPIED_FILES:
            if os.path.isfile(os.path.join(source.path, name)):
                shutil.copy(os.path.join(source.path, name), out)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(os.path.join(out, PARAMS_DIR)), nnx.to_pure_dict(state))
    return out


def restore_state(path: str, abstract_state: nnx.State, shardings: Any) -> nnx.State:
    """The parameter tree saved at `path`, restored in `abstract_state`'s shapes and dtypes,
    each array placed with its sharding in `shardings` (a tree like the state's pure dict) as
    it is read."""
    import orbax.checkpoint as ocp

    target = jax.tree.map(lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                   sharding=sharding),
                          nnx.to_pure_dict(abstract_state), shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.abspath(os.path.join(path, PARAMS_DIR)), target)
    state = jax.tree.map(lambda x: x, abstract_state)  # a copy to fill
    nnx.replace_by_pure_dict(state, restored)
    return state
