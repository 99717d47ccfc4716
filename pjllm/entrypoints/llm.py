"""The offline API: `LLM` for notebooks and batch scripts, and the one-call `generate`."""

from __future__ import annotations

import dataclasses
import itertools
import numbers
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from pjllm.config import EngineConfig
from pjllm.engine.engine import LLMEngine, PromptType
from pjllm.engine.input_processor import render_chat
from pjllm.outputs import RequestOutput
from pjllm.sampling_params import SamplingParams

Message = dict[str, str]
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


class LLM:
    """An engine with a model loaded, for offline generation.

    >>> llm = LLM(model="SmolLM2-135M-Instruct.Q4_1.gguf", max_model_len=2048)
    >>> llm.generate(["The capital of France is"], SamplingParams(max_tokens=8))[0].outputs[0].text

    Keyword arguments are the fields of `EngineConfig` (dtype, max_model_len, page_size,
    gpu_memory_utilization, num_pages, max_num_seqs, max_num_batched_tokens, seed,
    attention_backend, load_format, compilation_cache_dir, warmup, max_logprobs, tokenizer).
    """

    def __init__(self, model: str, **engine_kwargs: Any):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_kwargs))
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Frees this LLM's device memory (weights, KV cache, compiled programs) at once and
        stops its background compiles; the LLM cannot generate afterwards. Dropping the last
        reference to an LLM frees the same memory once it is garbage-collected."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates completions for each prompt; returns one RequestOutput per prompt, in order.

        A prompt is a string, a list of token ids, or a dict with `prompt` or `prompt_token_ids`;
        `prompts` is one prompt or a list of them. If generation fails or is interrupted, this
        call's requests are aborted, so the engine is ready for the next call.
        """
        prompts = _prompt_list(prompts)
        if not prompts:
            return []
        if sampling_params is None:
            sampling_params = self.engine.default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if not isinstance(sampling_params, (list, tuple)) or not all(
                isinstance(p, SamplingParams) for p in sampling_params):
            raise ValueError("sampling_params must be a SamplingParams or a list of them; got "
                             f"{type(sampling_params).__name__}")
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for "
                             f"{len(prompts)} prompts; give one, or one per prompt")
        request_ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                request_id = str(next(self._request_counter))
                self.engine.add_request(request_id, prompt, params)
                request_ids.append(request_id)
            with tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm) as progress:
                finished = self.engine.run_to_completion(progress=progress)
        except BaseException:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return [finished[request_id] for request_id in request_ids]

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Renders each conversation with the model's chat template, then generates.

        `messages` is one conversation (a list of {"role": ..., "content": ...} dicts) or a list
        of conversations.
        """
        conversations = _conversation_list(messages)
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer; this engine has none (dummy weights)")
        prompts: list[PromptType] = [
            {"prompt_token_ids": render_chat(tokenizer, conversation, chat_template, add_generation_prompt)}
            for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _conversation_list(messages: object) -> list[list[Message]]:
    """One conversation or a list of them, as a list of conversations, each message checked."""
    if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict):
        messages = [messages]
    if not isinstance(messages, (list, tuple)) or not all(isinstance(c, (list, tuple)) for c in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts, or a list "
                         f"of such lists; got {type(messages).__name__}")
    for conversation in messages:
        for message in conversation:
            if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                    or not isinstance(message.get("content"), str)):
                raise ValueError("each chat message must be a dict with string 'role' and 'content'; "
                                 f"got {message!r}")
    return [list(conversation) for conversation in messages]


def _prompt_list(prompts: object) -> list:
    """`prompts` as a list of prompts: one prompt (a string, a dict, a list of token ids) or a
    list of them. Each prompt's contents are checked when it is added to the engine."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)):
        raise ValueError("prompts must be a string, a list of token ids, a dict with 'prompt' or "
                         f"'prompt_token_ids', or a list of these; got {type(prompts).__name__}")
    if prompts and isinstance(prompts[0], numbers.Number):  # one prompt of token ids
        return [list(prompts)]
    return list(prompts)


def generate(prompts: PromptType | Sequence[PromptType], model: str, **kwargs: Any) -> list[RequestOutput]:
    """One call for scripts: loads `model`, generates, returns RequestOutputs.

    Keyword arguments go to SamplingParams (temperature, max_tokens, ...) or to the engine
    (dtype, max_model_len, ...) by name; `use_tqdm` to the progress bar.
    """
    use_tqdm = kwargs.pop("use_tqdm", False)
    unknown = set(kwargs) - _ENGINE_FIELDS - _SAMPLING_FIELDS
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)}; allowed: SamplingParams fields "
                         f"{sorted(_SAMPLING_FIELDS)} and engine fields {sorted(_ENGINE_FIELDS)}")
    params = SamplingParams(**{k: v for k, v in kwargs.items() if k in _SAMPLING_FIELDS})
    with LLM(model, **{k: v for k, v in kwargs.items() if k in _ENGINE_FIELDS}) as llm:
        return llm.generate(prompts, params, use_tqdm=use_tqdm)
