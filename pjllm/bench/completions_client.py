"""One streamed request to an OpenAI-compatible completions endpoint, timed chunk by chunk.

What `pjllm bench serve` sends and reads (the server side must honour it):

- POST the payload as JSON; a status other than 200 fails the request, with the body's
  `{"error": {"message": ...}}` (OpenAI), `{"detail": ...}` (FastAPI) or text as the message.
- The body is server-sent events: `data: <json>` lines, events separated by a blank line, the
  stream closed by `data: [DONE]`. A stream that ends without `[DONE]`, or an event carrying
  `{"error": ...}`, fails the request.
- A token event is a chunk whose `choices[0]` has non-empty `text`, or no `finish_reason` yet:
  a token whose text the detokenizer holds back (part of a UTF-8 character) still arrives as a
  chunk with `"text": ""`, while a closing chunk with only a finish reason is no token.
  The first token event gives the time to first token (TTFT), each later one an inter-token
  latency (ITL). A server that packs several tokens into one chunk gives one ITL per chunk.
- The output token count is `usage.completion_tokens` of the usage chunk
  (`stream_options.include_usage`) when one arrives, else the number of token events;
  `usage.prompt_tokens` is the prompt's length.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any, AsyncIterator

import httpx

DONE = "[DONE]"
MAX_ERROR_CHARS = 500  # an error body can be a whole HTML page; the report keeps its start


@dataclasses.dataclass
class RequestOutcome:
    """What one streamed request measured; times in seconds from the moment it was sent."""

    success: bool = False
    status: int | None = None            # HTTP status, None when no response came
    error: str | None = None
    prompt_tokens: int | None = None     # from the usage chunk, when the server sent one
    output_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = dataclasses.field(default_factory=list)
    e2e_s: float | None = None
    sent_at_s: float | None = None       # set by the caller: seconds since the benchmark started

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output tokens - 1)."""
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each server-sent event: `data:` lines of one event joined by newlines,
    dispatched at the blank line ending it; comments and other fields are skipped."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[len("data:"):]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:  # a last event whose blank line never came
        yield "\n".join(data)


def error_message(body: bytes) -> str:
    """The message of an error response body, OpenAI's or FastAPI's shape, else its text."""
    text = body.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        return text.strip()[:MAX_ERROR_CHARS]
    return _json_error_message(parsed)[:MAX_ERROR_CHARS]


def _json_error_message(parsed: Any) -> str:
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed.get("detail"))
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if error is not None:
            return str(error)
    return json.dumps(parsed)


def _is_token_event(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices")
    if not choices:
        return False
    choice = choices[0]
    return bool(choice.get("text")) or choice.get("finish_reason") is None


async def stream_completion(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
                            headers: dict[str, str], timeout_s: float) -> RequestOutcome:
    """POSTs one streamed completion and times its chunks; every failure, including running past
    `timeout_s` from start to `[DONE]`, is recorded in the outcome, never raised."""
    outcome = RequestOutcome()
    start = last_token_at = time.perf_counter()
    counted_tokens = 0
    completion_tokens: int | None = None
    finished = False
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url, json=payload, headers=headers) as response:
                outcome.status = response.status_code
                if response.status_code != 200:
                    outcome.error = f"HTTP {response.status_code}: {error_message(await response.aread())}"
                    return outcome
                async for data in sse_data(response.aiter_lines()):
                    now = time.perf_counter()
                    if data == DONE:
                        finished = True
                        break
                    chunk = json.loads(data)
                    if not isinstance(chunk, dict):
                        raise ValueError(f"event is not a JSON object: {data[:100]!r}")
                    if "error" in chunk:
                        outcome.error = f"stream error: {_json_error_message(chunk)[:MAX_ERROR_CHARS]}"
                        return outcome
                    if _is_token_event(chunk):
                        if outcome.ttft_s is None:
                            outcome.ttft_s = now - start
                        else:
                            outcome.itl_s.append(now - last_token_at)
                        last_token_at = now
                        counted_tokens += 1
                    if usage := chunk.get("usage"):
                        completion_tokens = usage.get("completion_tokens", completion_tokens)
                        outcome.prompt_tokens = usage.get("prompt_tokens", outcome.prompt_tokens)
    except TimeoutError:
        outcome.error = f"timed out after {timeout_s:g} s"
        return outcome
    except (httpx.HTTPError, httpx.StreamError, ValueError) as error:  # ValueError: bad JSON
        outcome.error = f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS]
        return outcome
    outcome.e2e_s = time.perf_counter() - start
    outcome.output_tokens = completion_tokens if completion_tokens is not None else counted_tokens
    if not finished:
        outcome.error = "the stream ended before data: [DONE]"
    elif outcome.ttft_s is None:
        outcome.error = "the stream held no token"
    else:
        outcome.success = True
    return outcome


async def first_model_id(client: httpx.AsyncClient, base_url: str, headers: dict[str, str],
                         timeout_s: float) -> str:
    """The first model id GET /v1/models lists; ConnectionError says why there is none."""
    url = f"{base_url}/v1/models"
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.get(url, headers=headers)
    except TimeoutError:
        raise ConnectionError(f"GET {url}: no answer within {timeout_s:g} s") from None
    except httpx.HTTPError as error:
        raise ConnectionError(f"GET {url}: {type(error).__name__}: {error}") from None
    if response.status_code != 200:
        raise ConnectionError(f"GET {url}: HTTP {response.status_code}: {error_message(response.content)}")
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConnectionError(f"GET {url}: no model id in {response.text[:200]!r}") from None
