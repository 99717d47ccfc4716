"""`pjllm serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one `AsyncLLM`.

Endpoints: /v1/completions, /v1/chat/completions (streaming and not), /v1/models, /tokenize,
/detokenize, /health, /version, /metrics. Every error is an OpenAI-style body; bad input is a 400
naming the field, never a 500. With an API key, /v1/* wants `Authorization: Bearer KEY`.
SIGTERM (or Ctrl-C): stop accepting, let running requests finish for `shutdown_timeout`
seconds, abort the rest, free the engine, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from typing import Any, AsyncIterator, Awaitable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pjllm.engine.async_engine import AsyncLLM, EngineDeadError, EngineOverloadedError
from pjllm.entrypoints.openai.metrics import ServerMetrics
from pjllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                               DetokenizeRequest, TokenizeRequest)
from pjllm.entrypoints.openai.server_config import ServerConfig
from pjllm.entrypoints.openai.serving import APIError, OpenAIServing

logger = logging.getLogger("pjllm")


def served_model_name(config: ServerConfig, model: str) -> str:
    return config.served_model_name or model


def build_app(engine: AsyncLLM, config: ServerConfig, model: str) -> FastAPI:
    """The FastAPI app serving `engine`. The engine's lifetime is the caller's."""
    name = served_model_name(config, model)
    template = None
    if config.chat_template is not None:
        with open(config.chat_template) as f:
            template = f.read()
    serving = OpenAIServing(engine, name, model, template)
    metrics = ServerMetrics(engine, name)
    engine.on_iteration = metrics.record

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_log_stats(metrics, config.log_stats_interval))
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="pjllm", lifespan=lifespan)
    app.state.serving, app.state.metrics = serving, metrics

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status == 503 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(error).body(), status_code=400)

    async def check_api_key(request: Request) -> None:
        if config.api_key is not None and request.headers.get("Authorization") != f"Bearer {config.api_key}":
            raise APIError(401, "a valid API key is needed: Authorization: Bearer KEY")

    # The /v1 routes want the API key (a dependency, not an HTTP middleware: starlette's
    # middleware runs the response in a task of its own, which hides a client's disconnect).
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            raise APIError(503, "the engine loop is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        from pjllm import __version__
        return {"version": __version__}

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return serving.models()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return serving.detokenize(body)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _respond(request, serving.completion(body))

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _respond(request, serving.chat(body))

    app.include_router(v1)

    return app


async def _respond(request: Request, work: Awaitable[dict[str, Any] | AsyncIterator[str]]) -> Response:
    """Runs an endpoint's work, stopping it (and aborting its engine requests) if the client
    disconnects first; engine refusals become 503s."""
    try:
        result = await _unless_disconnected(request, work)
    except EngineOverloadedError as error:
        raise APIError(503, f"the server is overloaded: {error}") from error
    except EngineDeadError as error:
        raise APIError(503, f"the engine is not running: {error}") from error
    if result is None:  # the client left; nobody reads this
        return Response(status_code=499)
    if isinstance(result, dict):
        return JSONResponse(result)
    # Starlette cancels a streaming response when the client disconnects; the cancellation
    # reaches the engine requests through the stream's generators, which abort them.
    return StreamingResponse(result, media_type="text/event-stream")


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result, or None if the client disconnected first (the work is cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        return None
    return task.result()


def _validation_error(error: RequestValidationError) -> APIError:
    """A 400 naming the first invalid field (pydantic's location, without "body")."""
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    param = ".".join(location) or None
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
    return APIError(400, message, param)


async def _log_stats(metrics: ServerMetrics, interval: float) -> None:
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        line = metrics.log_line()
        if line is not None:
            logger.info("%s", line)


def _follow(model: str, engine_kwargs: dict[str, Any]) -> int:
    """`pjllm serve` on a process other than the coordinator (several hosts): no HTTP; it
    loads its shards of the model and runs the steps the coordinator sends until it stops."""
    from pjllm.config import EngineConfig
    from pjllm.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_kwargs), detokenize=False)
    logger.info("process %d follows the coordinator at %s", engine.config.process_id,
                engine.config.coordinator_address)
    engine.follow()
    return 0


def serve(model: str, config: ServerConfig, engine_kwargs: dict[str, Any]) -> int:
    """Loads the model and serves it until SIGTERM or Ctrl-C; returns the exit code."""
    import uvicorn

    if engine_kwargs.get("num_processes", 1) > 1 and engine_kwargs.get("process_id", 0) != 0:
        return _follow(model, engine_kwargs)
    engine = AsyncLLM(model, max_waiting_requests=config.max_waiting_requests, **engine_kwargs)
    try:
        app = build_app(engine, config, model)
        gc.freeze()  # the startup heap (imports, the app): see LLMEngine.__init__
        server = uvicorn.Server(uvicorn.Config(
            app, host=config.host, port=config.port, log_level="info", access_log=False,
            timeout_graceful_shutdown=config.shutdown_timeout))
        logger.info("serving %s as %r on http://%s:%d", model, served_model_name(config, model),
                    config.host, config.port)
        # uvicorn shuts down gracefully on SIGTERM or Ctrl-C, then raises the signal again with
        # the handler it found; a no-op handler makes a clean shutdown exit 0.
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        engine.shutdown()
    return 0
