"""A stand-in OpenAI completions server for the `pjllm bench serve` tests.

It streams `max_tokens` chunks, `token_delay_s` apart, then a usage chunk (unless told not to)
and `data: [DONE]` in one write; it records every request body, the arrival times and the most
streams in flight at once. A text prompt picks a failure: "fail:503" (an error status),
"fail:midstream" (an error event after one token), "fail:disconnect" (the connection cut after
one token), "fail:nodone" (the response ends without `[DONE]`), "fail:stall" (no token for an
hour); "hold" waits (5 s at most) for `hold_streams` streams in flight before its first token; or a
framing: "framing:split" (each event written in pieces of 7 bytes, a moment apart),
"framing:crlf" (lines end in CRLF).
It runs uvicorn in a background thread on 127.0.0.1 at a free port; `with StubServer() as stub:`
stops it (connections closed within a second) however the block ends.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL_ID = "stub-model"
START_TIMEOUT_S = 10.0
HOLD_TIMEOUT_S = 5.0


class StubServer:
    def __init__(self, token_delay_s: float = 0.002) -> None:
        self.token_delay_s = token_delay_s
        self.include_usage = True
        self.hold_streams = 0
        self.coalesce = False
        self.bodies: list[dict[str, Any]] = []
        self.authorization: list[str | None] = []
        self.arrivals: list[float] = []   # time.perf_counter() at each completion request
        self.in_flight = 0
        self.peak_in_flight = 0
        app = Starlette(routes=[Route("/v1/models", self._models, methods=["GET"]),
                                Route("/v1/completions", self._completions, methods=["POST"])])
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical", lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="stub-openai-server", daemon=True)

    def reset(self, *, include_usage: bool = True, hold_streams: int = 0,
              coalesce: bool = False) -> None:
        """Forgets what earlier requests recorded (all handlers run on the server's own thread,
        so call this only between runs). `coalesce`: every stream is one finishing chunk with
        no text, as a server without a tokenizer sends when it fell behind."""
        self.include_usage = include_usage
        self.hold_streams = hold_streams
        self.coalesce = coalesce
        self.bodies.clear()
        self.authorization.clear()
        self.arrivals.clear()
        self.peak_in_flight = 0

    @property
    def url(self) -> str:
        port = self._server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __enter__(self) -> StubServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the stub server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})

    async def _completions(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        self.authorization.append(request.headers.get("authorization"))
        self.arrivals.append(time.perf_counter())
        if body["prompt"] == "fail:503":
            return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=503)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return StreamingResponse(self._stream(body), media_type="text/event-stream")

    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[str]:
        prompt, max_tokens = body["prompt"], body["max_tokens"]
        framing = prompt.removeprefix("framing:") if isinstance(prompt, str) else None
        try:
            if prompt == "fail:stall":
                await asyncio.sleep(3600)
            deadline = time.monotonic() + HOLD_TIMEOUT_S
            while prompt == "hold" and self.in_flight < self.hold_streams and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            for index in range(max_tokens):
                if self.coalesce and index < max_tokens - 1:
                    continue
                await asyncio.sleep(self.token_delay_s)
                if index == 1 and prompt == "fail:midstream":
                    yield _event({"error": {"message": "device failure", "type": "server_error"}})
                    return
                if index == 1 and prompt == "fail:disconnect":
                    raise ConnectionAbortedError("the stub cuts the stream")
                last = index == max_tokens - 1
                async for piece in _framed(framing, _event({
                        "id": "cmpl-stub", "object": "text_completion", "model": MODEL_ID,
                        "choices": [{"index": 0, "text": "" if self.coalesce else f" t{index}",
                                     "logprobs": None,
                                     "finish_reason": "length" if last else None}],
                        "usage": None})):
                    yield piece
            tail = "" if prompt == "fail:nodone" else "data: [DONE]\n\n"
            if self.include_usage:
                prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
                tail = _event({"id": "cmpl-stub", "object": "text_completion", "model": MODEL_ID,
                               "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                        "completion_tokens": max_tokens,
                                                        "total_tokens": prompt_tokens + max_tokens}}) + tail
            async for piece in _framed(framing, tail):
                yield piece
        finally:
            self.in_flight -= 1


async def _framed(framing: str | None, text: str) -> AsyncIterator[str]:
    """`text` as the stub writes it: whole, in 7-byte pieces a moment apart, or with CRLF line ends."""
    if framing == "split":
        for at in range(0, len(text), 7):
            await asyncio.sleep(0.001)
            yield text[at:at + 7]
    else:
        yield text.replace("\n", "\r\n") if framing == "crlf" else text


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
