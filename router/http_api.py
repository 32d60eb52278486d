"""The OpenAI-compatible HTTP front (FastAPI on uvicorn), beside gRPC in the same process, on the same router.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (SSE with `stream: true`), `GET /v1/models`,
`GET /health` (200 only when every pool has a live worker), `GET /metrics` (the router's Prometheus registry).
With an API key every endpoint but `/health` wants `Authorization: Bearer KEY` (compared in constant time).

A request's path: pydantic parses the body (400 naming the field, malformed JSON too) -> `router.convert`
validates and tokenizes it like a gRPC request -> a pump thread drives the blocking `Router.generate` and hands
its items to the event loop -> JSON or SSE chunks. A client that disconnects (or passes the `X-Request-Timeout`
seconds it asked for: 504) makes the router cancel the request on every worker, as a gRPC cancel does.
Errors have OpenAI's body, `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from engine.messages import ErrorKind, GenerationRequest
from llama_relax.generation import TokenEvent
from router.auth import ApiKey
from router.convert import InvalidArgument, OpenAIShape, request_from_openai
from router.metrics import Metrics
from router.openai_schema import ChatCompletionRequest, CompletionRequest
from router.record import Outcome, RouterError
from router.router import Done, Router
from router.server import ServedModel

log = logging.getLogger(__name__)
HTTP_STATUS = {
    ErrorKind.INVALID: 400,
    ErrorKind.BUSY: 429,
    ErrorKind.EVICTED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.TRANSFER_FAILED: 503,
    ErrorKind.CANCELLED: 499,
    ErrorKind.INTERNAL: 500,
}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
ERROR_TYPE |= {429: "rate_limit_error", 499: "cancelled", 500: "internal_error", 503: "service_unavailable"}
ERROR_TYPE |= {504: "timeout"}
TIMEOUT_HEADER = "x-request-timeout"  # seconds: the HTTP counterpart of a gRPC deadline


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "error"), "param": param, "code": code}}


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status)


def _router_error(e: RouterError) -> ApiError:
    return ApiError(HTTP_STATUS[e.kind], e.client_message, code=e.kind.value)


@dataclass(frozen=True)
class _Call:
    """What a request brought besides its body: arrival (monotonic), its deadline, the client's trace context."""

    arrival: float
    deadline: float | None
    traceparent: str


@dataclass
class _Run:
    """One request's items, produced by its pump thread: `TokenEvent`s, then `Done` or an `ApiError`."""

    queue: asyncio.Queue
    stop: threading.Event
    done: bool = False  # the router reported the end (nothing to cancel)


def _pump(router: Router, req: GenerationRequest, call: _Call, loop, run: _Run) -> None:
    """Drive the blocking router generator on this thread (which alone iterates and closes it)."""
    put = lambda item: loop.call_soon_threadsafe(run.queue.put_nowait, item)  # noqa: E731
    gen = router.generate(req, call.deadline, call.arrival, call.traceparent)
    try:
        for item in gen:
            put(item)
            if run.stop.is_set():
                break
    except RouterError as e:
        put(_router_error(e))
    except Exception:  # a bug on the request path: INTERNAL with an id, never a traceback
        put(_router_error(RouterError.bug(req.request_id)))
    finally:
        gen.close()
        put(None)


class OpenAIFront:
    """The FastAPI app over one router. `health()` says whether every pool has a live worker."""

    def __init__(
        self,
        router: Router,
        model: ServedModel,
        metrics: Metrics,
        health: Callable[[], bool],
        api_key: str | None = None,
    ) -> None:
        self.router, self.model, self.metrics, self.health = router, model, metrics, health
        self.api_key = ApiKey(api_key) if api_key else None
        self.app = self._build()

    # ---- app ----------------------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
        auth = [Depends(self._check_key)]

        @app.exception_handler(RequestValidationError)
        async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
            first = exc.errors()[0] if exc.errors() else {}
            loc = [str(x) for x in first.get("loc", ()) if x != "body"]
            param = ".".join(loc) or None
            if first.get("type") == "json_invalid":
                param, message = None, f"malformed JSON: {first.get('msg', '')}"
            elif first.get("type") == "extra_forbidden":
                message = f"{param}: unsupported parameter"
            else:
                message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid body"))
            return JSONResponse(error_body(400, message, param), status_code=400)

        @app.exception_handler(ApiError)
        async def api_error(_: Request, exc: ApiError) -> JSONResponse:
            return _error_response(exc)

        @app.exception_handler(HTTPException)
        async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
            return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

        @app.get("/health")
        async def health() -> Response:
            ok = self.health()
            return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

        @app.get("/metrics", dependencies=auth)
        async def metrics() -> Response:
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models", dependencies=auth)
        async def models() -> dict:
            card = {"id": self.model.name, "object": "model", "created": 0, "owned_by": "pdserve"}
            card["max_model_len"] = self.model.limits.context_window_size  # vLLM's name
            card["vocab_size"] = self.model.limits.vocab_size
            return {"object": "list", "data": [card]}

        @app.post("/v1/completions", dependencies=auth)
        async def completions(body: CompletionRequest, request: Request) -> Response:
            return await self._serve(body, request)

        @app.post("/v1/chat/completions", dependencies=auth)
        async def chat(body: ChatCompletionRequest, request: Request) -> Response:
            return await self._serve(body, request)

        return app

    async def _check_key(self, request: Request) -> None:
        if self.api_key is not None and not self.api_key.accepts(request.headers.get("authorization", "")):
            raise ApiError(401, f"{ApiKey.MISSING} (Authorization: Bearer KEY)", code="invalid_api_key")

    # ---- requests -----------------------------------------------------------------------------------------
    async def _serve(self, body: CompletionRequest | ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        try:
            req = request_from_openai(body, self.model.limits, self.model.tokenizer, self.model.name)
        except InvalidArgument as e:
            self.metrics.count(Outcome.INVALID)
            raise ApiError(400, str(e), e.field) from None
        call = _Call(arrival, _deadline(request, arrival), request.headers.get("traceparent", ""))
        run = _Run(asyncio.Queue(), threading.Event())
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=_pump, args=(self.router, req, call, loop, run), name="http-request", daemon=True
        ).start()
        shape = OpenAIShape(self.model.name, self.model.tokenizer, body, req, time.time())
        if body.stream:
            return StreamingResponse(self._sse(shape, run, request, call.deadline), media_type="text/event-stream")
        items: list[TokenEvent] = []
        async for item in self._items(run, request, call.deadline, shape.rid):
            if isinstance(item, Done):
                return JSONResponse(shape.whole(items, item.record))
            items.append(item)
        raise ApiError(499, "cancelled")  # the client went away

    async def _items(self, run: _Run, request: Request, deadline: float | None, rid: str) -> AsyncIterator:
        """The pump's items until the end; cancels the request when the client disconnects or the deadline
        passes (504), and stops the pump when the consumer stops."""
        try:
            while True:
                timeout = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
                try:
                    item = await asyncio.wait_for(run.queue.get(), timeout)
                except asyncio.TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise ApiError(504, "deadline exceeded", code="deadline_exceeded") from None
                    if await request.is_disconnected():
                        return
                    continue
                if item is None:
                    return
                if isinstance(item, ApiError):
                    run.done = True
                    raise item
                run.done = run.done or isinstance(item, Done)
                yield item
        finally:
            run.stop.set()
            if not run.done:  # the client went away, or the deadline passed: every worker drops it
                self.router.cancel(rid)

    async def _sse(self, shape: OpenAIShape, run: _Run, request: Request, deadline: float | None) -> AsyncIterator[str]:
        """SSE: a role chunk (chat), one chunk per token, the finish chunk, the usage chunk if asked, [DONE].
        An error after the stream started is one `data: {"error": ...}` event."""
        try:
            if shape.chat:
                yield _data(shape.first_chunk())
            async for item in self._items(run, request, deadline, shape.rid):
                if isinstance(item, Done):
                    if shape.include_usage:
                        yield _data(shape.usage_chunk(item.record))
                    break
                yield _data(shape.chunk(item))
        except ApiError as e:
            yield _data(error_body(e.status, e.message, e.param, e.code))
        yield "data: [DONE]\n\n"

    def serve(self, host: str, port: int) -> HttpServer:
        return HttpServer(self.app, host, port)


def _deadline(request: Request, arrival: float) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        raise ApiError(400, f"{TIMEOUT_HEADER}: a number of seconds, got {raw!r}", TIMEOUT_HEADER) from None
    if not seconds > 0:
        raise ApiError(400, f"{TIMEOUT_HEADER}: must be > 0", TIMEOUT_HEADER)
    return arrival + seconds


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class HttpServer:
    """uvicorn on a thread of its own (no signal handlers: `pdserve serve` owns those)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="http-api", daemon=True)

    def start(self, timeout_s: float = 30.0) -> HttpServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError("the HTTP server did not start (is the port taken?)")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        with contextlib.suppress(RuntimeError):
            self.thread.join(timeout_s)
