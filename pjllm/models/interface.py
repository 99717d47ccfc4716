"""The model interface: what the engine needs of a family's model class."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import jax
import numpy as np
from flax import nnx

from pjllm.config import ModelConfig
from pjllm.kernels.attention_metadata import AttentionMetadata
from pjllm.kernels.ops import AttentionBackend


class CausalLM(nnx.Module):
    """A decoder-only language model over the paged KV cache, as a Flax NNX module; each family
    subclasses it.

    Built as `cls(config, dtype, rngs)` (random weights) and split into (graphdef, state); the
    runner calls it inside `jax.jit` as a pure function of the state.
    """

    # HF `architectures` names the class runs, each with its config.json `model_type`.
    architectures: ClassVar[dict[str, str]] = {}
    # transformers' names for ModelConfig's fields where they differ (GPT-2's n_embd), and the
    # defaults of its config class for fields a config.json may leave out.
    hf_config_aliases: ClassVar[dict[str, str]] = {}
    hf_config_defaults: ClassVar[dict[str, Any]] = {}
    # The prefix of the bare model's tensor names, which a checkpoint saved from it lacks.
    base_model_prefix: ClassVar[str] = "model"
    # Whether linear / dynamic rope scaling stretches max_position_embeddings (Llama's configs
    # state the original context), or the config states the stretched one already (Gemma 3).
    rope_scaling_extends_context: ClassVar[bool] = True

    @classmethod
    def adapt_hf_config(cls, hf: dict[str, Any]) -> dict[str, Any]:
        """The config.json dict in the names ModelConfig.from_hf_config reads: the class's
        defaults under it, its aliases resolved."""
        hf = {**cls.hf_config_defaults, **hf}
        hf.update({name: hf[alias] for name, alias in cls.hf_config_aliases.items()
                   if alias in hf and name not in hf})
        return hf

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_caches: list[jax.Array],
                 metadata: AttentionMetadata,
                 backend: AttentionBackend) -> tuple[jax.Array, list[jax.Array]]:
        """token_ids, positions [T] -> (final hidden states [T, hidden], kv_caches with this
        step's K/V written; one [2, Hkv, P, page_size, D] array per layer)."""
        raise NotImplementedError

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [M, hidden] -> float32 logits [M, vocab]."""
        raise NotImplementedError

    @classmethod
    def checkpoint_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor of the family's transformers checkpoint for `config`, with its shape:
        what the (family-agnostic) loaders read and check."""
        raise NotImplementedError

    @classmethod
    def state_from_checkpoint(cls, config: ModelConfig,
                              hf: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        """The module's state from those tensors, one variable at a time: ('/'-joined NNX
        path, array) pairs, every variable once. `hf` reads a tensor when it is looked up, and
        the loader places each array on its devices before asking for the next, so look up
        only what the variable being built needs and keep nothing across yields: the host then
        holds about one parameter, not the model."""
        raise NotImplementedError
