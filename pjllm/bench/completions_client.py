"""One streamed request to an OpenAI-compatible completions endpoint, timed chunk by chunk.

What `pjllm bench serve` sends and reads (the server side must honour it):

- POST the payload as JSON; a status other than 200 fails the request, with the body's
  `{"error": {"message": ...}}` (OpenAI), `{"detail": ...}` (FastAPI) or text as the message.
- The body is server-sent events: `data: <json>` lines, events separated by a blank line, the
  stream closed by `data: [DONE]`; lines end in LF or CRLF. A stream that ends without `[DONE]`,
  or an event carrying `{"error": ...}`, fails the request.
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
from typing import Any

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

DONE = b"[DONE]"
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


class ServerSentEvents:
    """The `data` of server-sent events, fed one line at a time: the `data:` lines of an event
    joined by newlines, returned at the blank line ending it; comments and other fields are
    skipped. Lines end in LF or CRLF (a lone CR is not taken as a line end)."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: bytes | None = None

    def feed(self, line: bytes) -> bytes | None:
        """Takes one line, its ending kept or not; b"" (the end of the stream) ends an event as
        a blank line does. Returns the data of the event the line ends, else None."""
        line = line.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            value = line[6:] if line[5:6] == b" " else line[5:]
            self._data = value if self._data is None else self._data + b"\n" + value
            return None
        if line or self._data is None:
            return None
        data, self._data = self._data, None
        return data


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


def _is_token_event(chunk: dict[str, Any], first: bool) -> bool:
    """Whether a chunk brought tokens: it has text, or it does not finish the choice. A
    finishing chunk without text counts when it is the `first` with tokens: a server that fell
    behind sends a short request's tokens and its finish together, and without a tokenizer
    their text is empty."""
    choices = chunk.get("choices")
    if not choices:
        return False
    choice = choices[0]
    return bool(choice.get("text")) or choice.get("finish_reason") is None or first


def open_session(max_connections: int | None) -> aiohttp.ClientSession:
    """The HTTP session requests share: at most `max_connections` open at once (None: no limit,
    not even per host), each kept alive for a later request; no timeout of its own (a request's
    is its `timeout_s`); proxies from the environment, as curl."""
    connector = aiohttp.TCPConnector(limit=max_connections or 0, limit_per_host=0)
    # read_bufsize: the longest line read is twice this (a chunk packing many tokens can be long).
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(),
                                 read_bufsize=1 << 20, trust_env=True)


async def stream_completion(session: aiohttp.ClientSession, url: str, payload: dict[str, Any],
                            headers: dict[str, str], timeout_s: float) -> RequestOutcome:
    """POSTs one streamed completion and times its chunks; every failure, including running past
    `timeout_s` from start to `[DONE]`, is recorded in the outcome, never raised."""
    outcome = RequestOutcome()
    start = last_token_at = time.perf_counter()
    counted_tokens = 0
    completion_tokens: int | None = None
    finished = False
    events = ServerSentEvents()
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, json=payload, headers=headers) as response:
                outcome.status = response.status
                if response.status != 200:
                    outcome.error = f"HTTP {response.status}: {error_message(await response.read())}"
                    return outcome
                readline, line = response.content.readline, b"\n"
                while line and not finished:
                    line = await readline()  # b"" once the stream has ended
                    if (data := events.feed(line)) is None:
                        continue
                    now = time.perf_counter()
                    if data == DONE:
                        finished = True
                        continue
                    chunk = json.loads(data)
                    if not isinstance(chunk, dict):
                        raise ValueError(f"event is not a JSON object: {data[:100]!r}")
                    if "error" in chunk:
                        outcome.error = f"stream error: {_json_error_message(chunk)[:MAX_ERROR_CHARS]}"
                        return outcome
                    if _is_token_event(chunk, first=outcome.ttft_s is None):
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
    # ValueError: bad JSON or UTF-8; HttpProcessingError: a line longer than the read buffer allows.
    except (aiohttp.ClientError, HttpProcessingError, ValueError) as error:
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


async def first_model_id(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str],
                         timeout_s: float) -> str:
    """The first model id GET /v1/models lists; ConnectionError says why there is none."""
    url = f"{base_url}/v1/models"
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(url, headers=headers) as response:
                status, body = response.status, await response.read()
    except TimeoutError:
        raise ConnectionError(f"GET {url}: no answer within {timeout_s:g} s") from None
    except aiohttp.ClientError as error:
        raise ConnectionError(f"GET {url}: {type(error).__name__}: {error}") from None
    if status != 200:
        raise ConnectionError(f"GET {url}: HTTP {status}: {error_message(body)}")
    try:
        return str(json.loads(body)["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConnectionError(f"GET {url}: no model id in {body[:200].decode(errors='replace')!r}") from None
