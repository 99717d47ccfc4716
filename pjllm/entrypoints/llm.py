"""The offline API: `LLM` for notebooks and batch scripts, and the one-call `generate`."""

from __future__ import annotations

import dataclasses
import itertools
import numbers
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from pjllm.beam_search import (BeamSearchOutput, BeamSearchParams, BeamSearchSequence, best_beams,
                               extend_beams)
from pjllm.config import EngineConfig
from pjllm.engine.data_parallel import DataParallelEngine
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
    attention_backend, load_format, compilation_cache_dir, warmup, max_logprobs, tokenizer,
    enable_prefix_caching, tensor_parallel_size, data_parallel_size). A prompt dict may carry a
    "cache_salt": requests share cached prompt pages only with requests of the same salt.

    With `data_parallel_size` > 1, `engine` is a `DataParallelEngine`: that many replicas, each
    on its own `tensor_parallel_size` devices, requests spread over them; outputs come back in
    input order as with one.

    Several hosts (`num_processes` > 1, `coordinator_address`, `process_id`): every process
    runs the same script. On process 0 the LLM works as with one; on every other process the
    constructor loads that process's shards of the model, then runs the steps process 0 sends
    until process 0 shuts its LLM down (or exits), and `generate`, `chat` and `beam_search`
    return empty lists there: only process 0 gets outputs.
    """

    def __init__(self, model: str, **engine_kwargs: Any):
        config = EngineConfig.from_kwargs(model, **engine_kwargs)
        self.engine = (LLMEngine(config) if config.data_parallel_size == 1
                       else DataParallelEngine(config))
        self._request_counter = itertools.count()
        if config.num_processes > 1 and self.engine.is_follower:
            self.engine.follow()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _is_follower(self) -> bool:
        """Whether this process follows another's steps (several hosts, not process 0)."""
        return getattr(self.engine, "is_follower", False)

    def shutdown(self) -> None:
        """Frees this LLM's device memory (weights, KV cache, compiled programs) at once and
        stops its background compiles; the LLM cannot generate afterwards. Dropping the last
        reference to an LLM frees the same memory once it is garbage-collected."""
        self.engine.shutdown()

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prompt prefix (later requests compute their prompts in full
        until the cache fills again); True once done."""
        return self.engine.reset_prefix_cache()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Generates completions for each prompt; returns one RequestOutput per prompt, in order.

        A prompt is a string, a list of token ids, or a dict with `prompt` or `prompt_token_ids`
        (and optionally `cache_salt`); `prompts` is one prompt or a list of them. `priority`: one
        per prompt, with scheduling_policy="priority" (lower runs first). If generation fails or
        is interrupted, this call's requests are aborted, so the engine is ready for the next call.
        """
        prompts = _prompt_list(prompts)
        if not prompts or self._is_follower():
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
        if priority is None:
            priority = [0] * len(prompts)
        if not isinstance(priority, (list, tuple)) or len(priority) != len(prompts):
            raise ValueError(f"priority must be a list with one integer per prompt ({len(prompts)}); "
                             f"got {priority!r}")
        request_ids = []
        try:
            for prompt, params, rank in zip(prompts, sampling_params, priority):
                request_id = str(next(self._request_counter))
                self.engine.add_request(request_id, prompt, params, rank)
                request_ids.append(request_id)
            with tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm) as progress:
                finished = self.engine.run_to_completion(progress=progress)
        except BaseException:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return [finished[request_id] for request_id in request_ids]

    def beam_search(self, prompts: PromptType | Sequence[PromptType],
                    params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search (vLLM's `LLM.beam_search`): per prompt, its `params.beam_width` best beams,
        best first, scored as HF transformers scores them (summed output logprobs over output
        length ** length_penalty). Each step generates one token of every live beam with its top
        2 x beam_width logprobs (so 2 x beam_width must be <= max_logprobs); the beams share their
        pages through the prefix cache."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams; got {type(params).__name__}")
        if self._is_follower():
            return []
        max_logprobs = self.engine.config.max_logprobs
        if 2 * params.beam_width > max_logprobs:
            raise ValueError(f"BeamSearchParams.beam_width must be <= max_logprobs / 2 "
                             f"({max_logprobs // 2}); got {params.beam_width}")
        step_params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                                     logprobs=2 * params.beam_width)
        live, salts = [], []
        for prompt in _prompt_list(prompts):
            _, token_ids, salt = self.engine.inputs.process_prompt(prompt, step_params)
            salts.append({} if salt is None else {"cache_salt": salt})
            if len(token_ids) + params.max_tokens > self.engine.max_model_len:
                raise ValueError(f"prompt of {len(token_ids)} tokens plus max_tokens "
                                 f"({params.max_tokens}) exceeds max_model_len "
                                 f"({self.engine.max_model_len})")
            live.append([BeamSearchSequence(token_ids, [], num_prompt_tokens=len(token_ids))])
        finished: list[list[BeamSearchSequence]] = [[] for _ in live]
        eos = self.engine.model_config.eos_token_ids
        for _ in range(params.max_tokens):
            step_prompts = [{"prompt_token_ids": beam.tokens, **salts[index]}
                            for index, beams in enumerate(live) for beam in beams]
            if not step_prompts:
                break
            outputs = self.generate(step_prompts, step_params, use_tqdm=False)
            entries = iter(output.outputs[0].logprobs[0] for output in outputs)
            for index, beams in enumerate(live):
                live[index], done = extend_beams(beams, [next(entries) for _ in beams], params, eos)
                finished[index] += done
        results = []
        for index, beams in enumerate(live):
            best = best_beams(finished[index], beams, params)
            for beam in best:
                if self.engine.tokenizer is not None:
                    beam.text = self.engine.tokenizer.decode(beam.output_token_ids,
                                                             skip_special_tokens=True)
            results.append(BeamSearchOutput(best))
        return results

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
