"""What a request is checked and tokenized against, apart from the engine that runs it.

`InputProcessor` holds the model's config, its tokenizer and generation defaults, and the
resolved `max_model_len`: everything needed to turn a prompt and SamplingParams into checked
token ids, and nothing on a device. The engine uses it in `add_request`; a server uses it in its
own process, so the engine's step loop receives token ids it will accept.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from pjllm.config import EngineConfig, ModelConfig
from pjllm.runner.input_batch import MAX_BANNED_TOKENS
from pjllm.sampling_params import SamplingParams
from pjllm.validation import is_int

PromptType = str | dict[str, Any] | list[int]


class ProcessedPrompt(NamedTuple):
    """A checked prompt: its text (None when given as ids), its token ids, and its prefix-cache
    salt (a prompt dict's "cache_salt": requests share cached pages only with equal salts)."""

    text: str | None
    token_ids: list[int]
    cache_salt: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The prompt dict an engine accepts back (token ids checked already)."""
        prompt = {"prompt": self.text, "prompt_token_ids": self.token_ids}
        if self.cache_salt is not None:
            prompt["cache_salt"] = self.cache_salt
        return prompt


def _short_repr(values, limit: int = 8) -> str:
    """repr of a sequence, its first `limit` items only (error messages name the bad values)."""
    values = list(values)
    head = ", ".join(map(repr, values[:limit]))
    return f"[{head}{', ...' if len(values) > limit else ''}] ({len(values)} items)"


def render_chat(tokenizer: Any, conversation: list[dict[str, str]], chat_template: str | None = None,
                add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
    """The token ids of a conversation rendered with the tokenizer's chat template (or
    `chat_template`); transformers returns them bare or inside a BatchEncoding."""
    token_ids = tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                              add_generation_prompt=add_generation_prompt,
                                              tokenize=True, **template_kwargs)
    if isinstance(token_ids, dict) or hasattr(token_ids, "input_ids"):
        token_ids = token_ids["input_ids"]
    return list(token_ids)


class InputProcessor:
    """Checks requests against the model and the engine's limits, and tokenizes prompts."""

    def __init__(self, config: EngineConfig, load_tokenizer: bool = True):
        """`load_tokenizer=False`: prompts must be token ids (an engine core that gets them
        checked and tokenized already)."""
        from pjllm.models.weights import load_generation_defaults, load_hf_config, load_tokenizer

        if config.load_format != "dummy" and not os.path.exists(config.model):
            raise ValueError(f"model path {config.model!r} does not exist")
        self.config = config
        self.model_config = ModelConfig.from_hf_config(load_hf_config(config.model))
        wants_tokenizer = load_tokenizer and not config.skip_tokenizer_init and (
            config.load_format != "dummy" or config.tokenizer is not None)
        self.tokenizer = load_tokenizer(config.model, config.tokenizer) if wants_tokenizer else None
        self.generation_defaults = (load_generation_defaults(config.model)
                                    if config.generation_config == "auto" else {})
        self.max_model_len = self._resolve_max_model_len()

    def _resolve_max_model_len(self) -> int:
        """The user's max_model_len, or the model's context length; never past it."""
        limit = self.model_config.max_context_len
        if self.config.max_model_len is None:
            return limit
        if self.config.max_model_len > limit:
            raise ValueError(f"max_model_len ({self.config.max_model_len}) must be <= the model's "
                             f"context length ({limit}, from max_position_embeddings and rope "
                             f"scaling)")
        return self.config.max_model_len

    def default_sampling_params(self) -> SamplingParams:
        """What a request that sets nothing samples with: the model's generation_config.json
        defaults (`EngineConfig.generation_config`), else SamplingParams' own."""
        return SamplingParams(**self.generation_defaults)

    def process_prompt(self, prompt: PromptType, params: SamplingParams) -> ProcessedPrompt:
        """Checks a request against the model and tokenizes its prompt. Reads no engine state,
        so a server calls it on its own thread, before handing the ids to the step loop. Raises
        ValueError naming the field."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams; got {type(params).__name__}")
        self._check_against_model(params)
        text, token_ids = self._tokenize(prompt)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens; it must be shorter than "
                             f"max_model_len ({self.max_model_len})")
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise ValueError(f"cache_salt must be a non-empty string; got {salt!r}")
        return ProcessedPrompt(text, token_ids, salt)

    def check_priority(self, priority: object) -> None:
        """A request's priority: an integer, and other than 0 only under the priority policy."""
        if not is_int(priority):
            raise ValueError(f"priority must be an integer; got {priority!r}")
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise ValueError(f"priority must be 0 unless scheduling_policy is 'priority' (it is "
                             f"{self.config.scheduling_policy!r}); got {priority}")

    def _check_against_model(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: limits set by the model and the engine."""
        vocab = self.model_config.vocab_size
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"SamplingParams.n must be <= max_num_seqs ({self.config.max_num_seqs}); "
                             f"got {params.n}")
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(params, field)
            if value is not None and value > vocab:
                raise ValueError(f"SamplingParams.{field} must be <= the vocabulary size ({vocab}); "
                                 f"got {value}")
            if value is not None and value > self.config.max_logprobs:
                raise ValueError(f"SamplingParams.{field} must be <= max_logprobs "
                                 f"({self.config.max_logprobs}); got {value}")
        outside = [t for t in params.stop_token_ids if t >= vocab]
        if outside:
            raise ValueError(f"SamplingParams.stop_token_ids must be in [0, {vocab}); got {outside}")
        banned = len(params.stop_token_ids) + (0 if params.ignore_eos else
                                               len(self.model_config.eos_token_ids))
        if params.min_tokens > 0 and banned > MAX_BANNED_TOKENS:
            raise ValueError(f"SamplingParams.stop_token_ids: with min_tokens > 0, at most "
                             f"{MAX_BANNED_TOKENS} stop and EOS ids can be held back; got {banned}")

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(prompt text or None, token ids), checked: ids are integers in [0, vocab_size)."""
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "cache_salt"}
            if unknown or not set(prompt) & {"prompt", "prompt_token_ids"}:
                raise ValueError("a prompt dict takes 'prompt' (text) or 'prompt_token_ids', and "
                                 f"optionally 'cache_salt'; got keys {sorted(map(str, prompt))}")
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"prompt must be a string; got {type(text).__name__}")
            if "prompt_token_ids" in prompt:
                return text, self._check_token_ids(prompt["prompt_token_ids"])
            prompt = text
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer (skip_tokenizer_init, or dummy weights): "
                                 "pass prompt_token_ids")
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self._check_token_ids(self.tokenizer.encode(prompt))
        if not isinstance(prompt, (list, tuple, np.ndarray)):
            raise ValueError("prompt must be a string, a list of token ids, or a dict with 'prompt' or "
                             f"'prompt_token_ids'; got {type(prompt).__name__}")
        return None, self._check_token_ids(prompt)

    def _check_token_ids(self, token_ids: object) -> list[int]:
        """The ids as plain ints; each must be an integer in [0, vocab_size) (a tokenizer's too:
        one with added tokens past the model's vocabulary would be read out of bounds)."""
        vocab = self.model_config.vocab_size
        if not isinstance(token_ids, (list, tuple)) and not (
                isinstance(token_ids, np.ndarray) and token_ids.ndim == 1):
            raise ValueError("prompt_token_ids must be a flat list of integer token ids; got "
                             f"{type(token_ids).__name__}")
        if len(token_ids) == 0:
            raise ValueError("prompt_token_ids must not be empty")
        # Plain ints (what JSON and tokenizers give) are checked at C speed: a server checks
        # every prompt token of every request, and the generic check cost 12% of its CPU.
        if isinstance(token_ids, list) and set(map(type, token_ids)) == {int}:
            ids = list(token_ids)
        elif all(is_int(t) for t in token_ids):
            ids = [int(t) for t in token_ids]
        else:
            raise ValueError("prompt_token_ids must be a flat list of integer token ids; got "
                             f"{_short_repr(token_ids)}")
        if min(ids) < 0 or max(ids) >= vocab:
            outside = [t for t in ids if not 0 <= t < vocab]
            raise ValueError(f"prompt_token_ids must be in [0, {vocab}); got {_short_repr(outside)}")
        return ids
