"""The OpenAI endpoints' work: requests to engine calls, engine outputs to response bodies.

Tokenizing and chat templating happen here, on the server's side of the engine loop; the
engine's step loop sees token ids only. Streaming sends each new piece of text as a delta; while
a request has stop strings and is not finished, the last len(longest stop) - 1 characters are
held back, since a stop string completed by a later token cuts the text before them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
import uuid
from typing import Any, AsyncIterator

from pjllm.engine.async_engine import AsyncLLM
from pjllm.engine.input_processor import render_chat
from pjllm.outputs import CompletionOutput, Logprob, RequestOutput
from pjllm.sampling_params import SamplingParams

from pjllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                               DetokenizeRequest, SamplingRequest, TokenizeRequest)


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 error_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.error_type = error_type or _ERROR_TYPES.get(status, "InternalServerError")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.status}}


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                503: "ServiceUnavailableError"}


# What a refusal's message may start with that is also a request field.
_FIELDS = {field.name for field in dataclasses.fields(SamplingParams)} | {
    "prompt", "prompt_token_ids", "messages", "cache_salt", "priority"}


def bad_request(error: ValueError) -> APIError:
    """A 400 for the engine's or SamplingParams' refusal; `param` is the field its message
    starts with ("SamplingParams.top_p must be ...", "prompt is 9000 tokens; ...")."""
    message = str(error)
    match = re.match(r"(?:SamplingParams\.)?(\w+)", message)
    return APIError(400, message, match.group(1) if match and match.group(1) in _FIELDS else None)


class OpenAIServing:
    """Completions, chat completions, models and tokenization for one served model."""

    def __init__(self, engine: AsyncLLM, model_name: str, model_path: str,
                 chat_template: str | None = None):
        self.engine = engine
        self.model_name = model_name
        self.model_path = model_path
        self.chat_template = chat_template
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.defaults = engine.inputs.generation_defaults

    # ------------------------------------------------------------------ small endpoints
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server has {self.model_name!r}",
                           param="model")

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "pjllm",
            "root": self.model_path, "parent": None, "max_model_len": self.max_model_len}]}

    def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        self.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if request.messages is not None:
            tokens = self._render_chat(request.messages, request.add_generation_prompt, None)
        else:
            tokens = self._require_tokenizer().encode(request.prompt,
                                                      add_special_tokens=request.add_special_tokens)
        return {"tokens": list(tokens), "count": len(tokens), "max_model_len": self.max_model_len}

    def detokenize(self, request: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(request.model)
        vocab = self.engine.vocab_size
        if not all(0 <= t < vocab for t in request.tokens):
            raise APIError(400, f"tokens must be in [0, {vocab})", param="tokens")
        return {"prompt": self._require_tokenizer().decode(request.tokens)}

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise APIError(400, "this server has no tokenizer (dummy weights or skip_tokenizer_init): "
                                "send prompts as token ids")
        return self.tokenizer

    # ------------------------------------------------------------------ completions
    async def completion(self, request: CompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        """POST /v1/completions: a response body, or an iterator of SSE lines when streaming."""
        self.check_model(request.model)
        if request.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if request.echo and request.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported", param="echo")
        params = self._params(request, request.max_tokens, request.logprobs)
        prompts = [self._prepare({"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p},
                                 params, request.cache_salt)
                   for p in request.prompts()]
        prefixes = [(p.get("prompt") or self._decode(p["prompt_token_ids"])) if request.echo else ""
                    for p in prompts]
        response = _Response(f"cmpl-{uuid.uuid4().hex}", "text_completion", self.model_name,
                             request.n, self.tokenizer)
        if request.stream:
            return self._stream(request, response, prompts, params, prefixes, chat=False)
        outputs = await self._final_outputs(response.id, prompts, params, request.priority)
        choices = []
        for i, output in enumerate(outputs):
            for completion in output.outputs:
                choice = {"index": i * request.n + completion.index,
                          "text": prefixes[i] + completion.text,
                          "logprobs": response.completion_logprobs(completion, 0, len(prefixes[i]))
                          if request.logprobs is not None else None,
                          "finish_reason": completion.finish_reason,
                          "stop_reason": completion.stop_reason}
                self._extras(request, choice, output, completion)
                choices.append(choice)
        return response.body(choices, _usage(outputs))

    # ------------------------------------------------------------------ chat
    async def chat(self, request: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        """POST /v1/chat/completions: a response body, or an iterator of SSE lines."""
        self.check_model(request.model)
        num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        if request.top_logprobs and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_logprobs = self.engine.inputs.config.max_logprobs
        if num_logprobs is not None and num_logprobs > max_logprobs:
            raise APIError(400, f"top_logprobs must be <= max_logprobs ({max_logprobs}); got "
                                f"{num_logprobs}", param="top_logprobs")
        params = self._params(request, request.max_completion_tokens or request.max_tokens, num_logprobs)
        token_ids = self._render_chat(request.messages, request.add_generation_prompt,
                                      request.chat_template_kwargs)
        prompts = [self._prepare({"prompt_token_ids": token_ids}, params, request.cache_salt)]
        response = _Response(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", self.model_name,
                             request.n, self.tokenizer)
        if request.stream:
            return self._stream(request, response, prompts, params, [""], chat=True)
        [output] = await self._final_outputs(response.id, prompts, params, request.priority)
        choices = []
        for completion in output.outputs:
            choice = {"index": completion.index,
                      "message": {"role": "assistant", "content": completion.text},
                      "logprobs": response.chat_logprobs(completion, 0, num_logprobs)
                      if num_logprobs is not None else None,
                      "finish_reason": completion.finish_reason,
                      "stop_reason": completion.stop_reason}
            self._extras(request, choice, output, completion)
            choices.append(choice)
        return response.body(choices, _usage([output]))

    def _render_chat(self, messages, add_generation_prompt: bool,
                     template_kwargs: dict[str, Any] | None) -> list[int]:
        tokenizer = self._require_tokenizer()
        try:
            conversation = [{"role": m.role, "content": m.text()} for m in messages]
            return render_chat(tokenizer, conversation, self.chat_template, add_generation_prompt,
                               **(template_kwargs or {}))
        except Exception as error:  # noqa: BLE001 - a template's refusal is the request's fault
            raise APIError(400, f"the chat template could not render these messages: {error}",
                           param="messages") from error

    # ------------------------------------------------------------------ shared
    def _params(self, request: SamplingRequest, max_tokens: int | None,
                logprobs: int | None) -> SamplingParams:
        try:
            self.engine.inputs.check_priority(request.priority)
            return request.sampling_params(self.defaults, max_tokens, logprobs)
        except ValueError as error:
            raise bad_request(error) from error

    def _prepare(self, prompt: dict[str, Any], params: SamplingParams,
                 cache_salt: str | None) -> dict[str, Any]:
        """Tokenizes and checks a prompt here, so the engine loop gets token ids it accepts."""
        if cache_salt is not None:
            prompt = {**prompt, "cache_salt": cache_salt}
        try:
            return self.engine.process_prompt(prompt, params).as_dict()
        except ValueError as error:
            raise bad_request(error) from error

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""

    @staticmethod
    def _extras(request: SamplingRequest, choice: dict[str, Any], output: RequestOutput,
                completion: CompletionOutput) -> None:
        """vLLM's extra response fields, when asked for."""
        if request.return_token_ids:
            choice["prompt_token_ids"] = output.prompt_token_ids
            choice["token_ids"] = completion.token_ids
        if request.prompt_logprobs is not None:
            choice["prompt_logprobs"] = _prompt_logprobs_json(output.prompt_logprobs)

    async def _final_outputs(self, request_id: str, prompts: list[dict[str, Any]],
                             params: SamplingParams, priority: int) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(prompts)
        async for index, output in _merged(self.engine, request_id, prompts, params, priority):
            finals[index] = output
        for output in finals:
            for completion in output.outputs:
                if completion.finish_reason and completion.finish_reason.startswith("error"):
                    raise APIError(500, f"generation failed: {completion.finish_reason}")
        return finals

    async def _stream(self, request: SamplingRequest, response: "_Response", prompts: list[dict[str, Any]],
                      params: SamplingParams, prefixes: list[str], chat: bool) -> AsyncIterator[str]:
        """SSE lines: a chunk per prompt and choice each time there is new text, then usage if
        asked, then [DONE]. An error after the stream started is sent as an error event."""
        holdback = max((len(s) for s in params.stop), default=1) - 1
        sent_text: dict[tuple[int, int], int] = {}
        sent_tokens: dict[tuple[int, int], int] = {}
        finals: dict[int, RequestOutput] = {}
        include_usage = request.stream_options is not None and request.stream_options.include_usage
        try:
            async for index, output in _merged(self.engine, response.id, prompts, params,
                                               request.priority):
                finals[index] = output
                for completion in output.outputs:
                    key = (index, completion.index)
                    text_from, tokens_from = sent_text.get(key), sent_tokens.get(key, 0)
                    first = text_from is None
                    finished = completion.finish_reason is not None
                    if finished and completion.finish_reason.startswith("error"):
                        raise APIError(500, f"generation failed: {completion.finish_reason}")
                    text_to = len(completion.text) if finished else max(
                        len(completion.text) - holdback, text_from or 0)
                    delta = completion.text[text_from or 0:text_to]
                    if not delta and len(completion.token_ids) == tokens_from and not finished \
                            and not first:
                        continue  # no new token (a client counts chunks as tokens)
                    sent_text[key], sent_tokens[key] = text_to, len(completion.token_ids)
                    choice = response.stream_choice(
                        index * request.n + completion.index, completion, delta, first, finished,
                        prefixes[index], tokens_from, params, chat)
                    if first and request.return_token_ids:
                        choice["prompt_token_ids"] = output.prompt_token_ids
                    if request.return_token_ids:
                        choice["token_ids"] = completion.token_ids[tokens_from:]
                    yield _sse(response.chunk([choice]))
            if include_usage:
                yield _sse(response.chunk([], _usage(list(finals.values()))))
        except APIError as error:
            yield _sse(error.body())
        except Exception as error:  # noqa: BLE001 - the stream has started: report, do not drop
            yield _sse(APIError(503 if "engine" in type(error).__name__.lower() else 500,
                                f"{type(error).__name__}: {error}").body())
        yield "data: [DONE]\n\n"


async def _merged(engine: AsyncLLM, request_id: str, prompts: list[dict[str, Any]],
                  params: SamplingParams, priority: int) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) of every prompt's request as outputs come. Closing this iterator
    (the client went away) cancels them all, which aborts their requests in the engine."""
    if len(prompts) == 1:  # the usual case: no tasks and no second queue in the way
        async with contextlib.aclosing(engine.generate(prompts[0], params, f"{request_id}-0",
                                                       priority)) as outputs:
            async for output in outputs:
                yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for output in engine.generate(prompts[index], params, f"{request_id}-{index}",
                                                priority):
                queue.put_nowait((index, output))
        except BaseException as error:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((index, error))
            if isinstance(error, asyncio.CancelledError):
                raise
        else:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(index)) for index in range(len(prompts))]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(outputs: list[RequestOutput]) -> dict[str, Any]:
    prompt = sum(len(output.prompt_token_ids) for output in outputs)
    completion = sum(len(c.token_ids) for output in outputs for c in output.outputs)
    cached = sum(output.num_cached_tokens or 0 for output in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _prompt_logprobs_json(prompt_logprobs) -> list[dict[str, Any] | None] | None:
    if prompt_logprobs is None:
        return None
    return [None if entry is None else {str(token_id): {"logprob": lp.logprob, "rank": lp.rank,
                                                        "decoded_token": lp.decoded_token}
                                        for token_id, lp in entry.items()}
            for entry in prompt_logprobs]


class _Response:
    """Builds one response's bodies and chunks (ids, object names, logprob formats)."""

    def __init__(self, response_id: str, object_name: str, model_name: str, n: int, tokenizer: Any):
        self.id = response_id
        self.object = object_name
        self.model = model_name
        self.n = n
        self.created = int(time.time())
        self.tokenizer = tokenizer

    def body(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        chunk_object = "chat.completion.chunk" if self.object == "chat.completion" else self.object
        body = {"id": self.id, "object": chunk_object, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def stream_choice(self, index: int, completion: CompletionOutput, delta: str, first: bool,
                      finished: bool, prefix: str, tokens_from: int, params: SamplingParams,
                      chat: bool) -> dict[str, Any]:
        num_logprobs = params.logprobs
        finish = {"finish_reason": completion.finish_reason if finished else None,
                  "stop_reason": completion.stop_reason if finished else None}
        if chat:
            message = {"role": "assistant", "content": delta} if first else {"content": delta}
            return {"index": index, "delta": message,
                    "logprobs": self.chat_logprobs(completion, tokens_from, num_logprobs)
                    if num_logprobs is not None else None, **finish}
        text = (prefix if first else "") + delta
        return {"index": index, "text": text,
                "logprobs": self.completion_logprobs(completion, tokens_from, 0)
                if num_logprobs is not None else None, **finish}

    def _token_text(self, token_id: int, logprob: Logprob | None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return f"token_id:{token_id}"

    def completion_logprobs(self, completion: CompletionOutput, start: int, offset: int) -> dict[str, Any]:
        """The legacy completions logprobs object for tokens[start:], text offsets from `offset`."""
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for token_id, entry in zip(completion.token_ids[start:], (completion.logprobs or [])[start:]):
            text = self._token_text(token_id, entry.get(token_id))
            tokens.append(text)
            token_logprobs.append(entry[token_id].logprob)
            top_logprobs.append({self._token_text(t, lp): lp.logprob for t, lp in entry.items()})
            text_offset.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}

    def chat_logprobs(self, completion: CompletionOutput, start: int, num_top: int) -> dict[str, Any]:
        """The chat logprobs object ({"content": [...]}) for tokens[start:]."""
        content = []
        for token_id, entry in zip(completion.token_ids[start:], (completion.logprobs or [])[start:]):
            chosen = entry[token_id]
            text = self._token_text(token_id, chosen)
            top = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= num_top),
                         key=lambda item: item[1].rank)
            content.append({"token": text, "logprob": chosen.logprob, "bytes": list(text.encode()),
                            "top_logprobs": [{"token": self._token_text(t, lp), "logprob": lp.logprob,
                                              "bytes": list(self._token_text(t, lp).encode())}
                                             for t, lp in top]})
        return {"content": content}

