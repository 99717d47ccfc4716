"""The offline API: `LLM` for notebooks and batch scripts, and the one-call `generate`."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

from tqdm import tqdm

from pjllm.config import EngineConfig
from pjllm.engine.engine import LLMEngine, PromptType
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
    attention_backend, load_format, compilation_cache_dir, warmup, tokenizer).
    """

    def __init__(self, model: str, **engine_kwargs: Any):
        unknown = set(engine_kwargs) - _ENGINE_FIELDS
        if unknown:
            raise ValueError(f"unknown LLM argument(s) {sorted(unknown)}; "
                             f"allowed: {sorted(_ENGINE_FIELDS - {'model'})}")
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates completions for each prompt; returns one RequestOutput per prompt, in order.

        A prompt is a string, a list of token ids, or a dict with `prompt` or `prompt_token_ids`.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for "
                             f"{len(prompts)} prompts; give one, or one per prompt")
        request_ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                request_id = str(next(self._request_counter))
                self.engine.add_request(request_id, prompt, params)
                request_ids.append(request_id)
        except ValueError:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        with tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm) as progress:
            finished = self.engine.run_to_completion(progress=progress)
        return [finished[request_id] for request_id in request_ids]

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Renders each conversation with the model's chat template, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer; this engine has none (dummy weights)")
        prompts = []
        for conversation in conversations:
            token_ids = tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                tokenize=True)
            if isinstance(token_ids, dict) or hasattr(token_ids, "input_ids"):
                token_ids = token_ids["input_ids"]
            prompts.append({"prompt_token_ids": list(token_ids)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


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
    llm = LLM(model, **{k: v for k, v in kwargs.items() if k in _ENGINE_FIELDS})
    return llm.generate(prompts, params, use_tqdm=use_tqdm)
