"""The OpenAI-compatible HTTP API of the agent (FastAPI), in front of the scheduler.

Invariants:

- Every response that is not a success carries OpenAI's error body
  (:class:`protocol.inference.ErrorBody`), including 401, 404, 405, 413, 429 and
  validation failures (400, with ``param`` naming the field, never 422).
- A request body is read by the gate, at most ``limits.body_max_bytes``, before anything
  parses it; a longer one gets 413 without being read further.
- A request that did not arrive on the Unix socket (TCP) must carry
  ``Authorization: Bearer <token>``; without a configured token it is refused.
- A generation request captures the active engine once, at admission, and finishes on it.
- The engine is only ever called from the scheduler's worker threads.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.config import LimitSettings
from agent.errors import (
    ContextLengthError,
    DeadlineExceededError,
    OverloadedError,
    RequestError,
)
from agent.runtime.sampling import FinishReason as EngineFinish
from agent.runtime.sampling import SamplingParams
from agent.server.holder import EngineLike, GenerationLike, ModelHolder
from agent.server.listeners import PEER_EXTENSION, Peer
from agent.server.metrics import CONTENT_TYPE, ServerMetrics
from agent.server.runner import Scheduler
from protocol import inference as api

log = logging.getLogger("nanofleet.agent.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Routes named in metrics; anything else counts as "other" (bounded label values).
_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    }
)
#: Owner shown in the model list.
OWNED_BY = "nanofleet"


class ServingEngine(EngineLike, Protocol):
    """The engine as the API calls it (the runtime's :class:`agent.runtime.Engine`)."""

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
    ) -> GenerationLike: ...


@dataclass
class ServerState:
    """What the API needs from the daemon; ``ready`` is set once the model has answered."""

    holder: ModelHolder[Any]
    scheduler: Scheduler
    limits: LimitSettings
    tcp_token: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    #: Called with a chat request's messages once its answer is complete (the opt-in
    #: capture of turns into the local training store); must return at once.
    on_chat_turn: Callable[[list[api.ChatMessage]], None] | None = None


class _ClientGoneError(Exception):
    """The client closed the connection before its answer was ready."""


def error_response(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An OpenAI-shaped error response."""
    body = api.ErrorBody(
        error=api.ErrorDetail(message=message[:4096], type=kind, param=param, code=code)
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


# -- the gate: auth, body limit, per-request log and count ---------------------------------


class _Gate:
    """Outermost ASGI layer: who may ask, how much they may send, what happened."""

    def __init__(self, app: ASGIApp, state: ServerState, metrics: ServerMetrics) -> None:
        self._app = app
        self._state = state
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.monotonic()
        peer: Peer | None = scope.get("extensions", {}).get(PEER_EXTENSION)
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            outcome = self._authorize(scope, peer) or await self._read_body(scope, receive)
            if isinstance(outcome, Response):
                await outcome(scope, receive, send_status)
                return
            await self._app(scope, _replay(outcome, receive), send_status)
        except Exception:
            status = status or 500  # answered by the error middleware outside this gate
            raise
        finally:
            route = scope["path"] if scope["path"] in _ROUTES else "other"
            self._metrics.requests.labels(route=route, status=str(status or 499)).inc()
            log.info(
                "request",
                extra={
                    "event": "request",
                    "method": scope["method"],
                    "path": scope["path"][:256],
                    "status": status or 499,
                    "duration_ms": round((time.monotonic() - started) * 1000, 2),
                    "transport": peer.transport if peer else None,
                    "peer_uid": peer.uid if peer else None,
                    "peer_pid": peer.pid if peer else None,
                    "peer_address": peer.address if peer else None,
                },
            )

    def _authorize(self, scope: Scope, peer: Peer | None) -> Response | None:
        if peer is not None and peer.transport == "unix":
            return None  # the socket's mode and group decided already
        token = self._state.tcp_token
        presented = _bearer(scope)
        if (
            token is not None
            and presented is not None
            and hmac.compare_digest(presented.encode(), token.encode())
        ):
            return None
        return error_response(
            401,
            "missing or wrong bearer token: requests over TCP need 'Authorization: Bearer <token>'",
            param="Authorization",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | Response:
        limit = self._state.limits.body_max_bytes
        too_large = error_response(
            413,
            f"request body exceeds the limit of {limit} bytes",
            code="body_too_large",
        )
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return error_response(400, "Content-Length is not a number", param="Content-Length")
            if int(declared) > limit:
                return too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _bearer(scope: Scope) -> str | None:
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# -- request handling ----------------------------------------------------------------------


def _parse(model: type[api.ChatCompletionRequest] | type[api.CompletionRequest], raw: bytes) -> Any:
    if not raw.strip():
        raise RequestError("the request body is empty; send a JSON object")
    try:
        json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from e
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        body = api.validation_error_body(e)
        raise _InvalidBodyError(body) from e


class _InvalidBodyError(Exception):
    def __init__(self, body: api.ErrorBody) -> None:
        super().__init__(body.error.message)
        self.body = body


@dataclass(frozen=True)
class _Job:
    """One admitted generation: the engine it captured and what to run on it."""

    engine: Any
    prompt_ids: list[int]
    params: SamplingParams
    model_id: str


def _model_id(engine: EngineLike) -> str:
    return str(engine.manifest.name)


def _check_model(requested: str | None, engine: EngineLike) -> None:
    served = _model_id(engine)
    if requested is not None and requested != served:
        raise RequestError(
            f"model {requested!r} is not served here; the active model is {served!r}",
            param="model",
        )


def _check_limits(
    req: api.ChatCompletionRequest | api.CompletionRequest, limits: LimitSettings
) -> None:
    if isinstance(req, api.ChatCompletionRequest) and len(req.messages) > limits.messages_max:
        raise RequestError(
            f"messages has {len(req.messages)} entries, over the limit of {limits.messages_max}",
            param="messages",
        )
    limit = req.token_limit if isinstance(req, api.ChatCompletionRequest) else req.max_tokens
    if limit is not None and limit > limits.max_tokens_max:
        name = (
            "max_tokens"
            if req.max_tokens is not None or isinstance(req, api.CompletionRequest)
            else "max_completion_tokens"
        )
        raise RequestError(
            f"{name} is {limit}, over the limit of {limits.max_tokens_max}", param=name
        )
    stops = req.stop_sequences
    if len(stops) > limits.stop_strings_max:
        raise RequestError(
            f"stop has {len(stops)} sequences, over the limit of {limits.stop_strings_max}",
            param="stop",
        )
    for i, text in enumerate(stops):
        if len(text) > limits.stop_string_max_chars:
            raise RequestError(
                f"stop sequence {i} has {len(text)} characters, over the limit of "
                f"{limits.stop_string_max_chars}",
                param="stop" if isinstance(req.stop, str) else f"stop[{i}]",
            )


def _plan(
    req: api.ChatCompletionRequest | api.CompletionRequest,
    engine: EngineLike,
    limits: LimitSettings,
) -> _Job:
    _check_model(req.model, engine)
    _check_limits(req, limits)
    if isinstance(req, api.ChatCompletionRequest):
        prompt = engine.render_chat([(m.role.value, m.text) for m in req.messages])
        where = "messages"
        asked = req.token_limit
    else:
        prompt = req.prompt
        where = "prompt"
        asked = req.max_tokens
    ids = engine.encode(prompt)
    if not ids:
        # The model needs at least one token to condition on; an empty prompt has none.
        raise RequestError(f"{where} encodes to no tokens; give at least one", param=where)
    context = engine.context_length
    if len(ids) >= context:
        raise ContextLengthError(
            f"{where} is {len(ids)} tokens; the model's context is {context} tokens "
            "(prompt and completion together)"
        )
    room = context - len(ids)
    if asked is not None and asked > room:
        raise ContextLengthError(
            f"the model's context is {context} tokens, but {len(ids)} are in the {where} "
            f"and max_tokens asks for {asked}; lower max_tokens to at most {room}"
        )
    max_tokens = asked if asked is not None else min(limits.max_tokens_max, room)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        stop=req.stop_sequences,
    )
    return _Job(engine=engine, prompt_ids=ids, params=params, model_id=_model_id(engine))


@dataclass
class _Outcome:
    generation: GenerationLike | None = None


def _work(
    job: _Job, outcome: _Outcome, metrics: ServerMetrics
) -> Callable[[threading.Event], Iterator[str]]:
    def run(cancel: threading.Event) -> Iterator[str]:
        generation = job.engine.generate(job.prompt_ids, job.params, cancel=cancel)
        try:
            yield from generation
        finally:
            # Counted here, in the worker, so that generations whose client left count too.
            outcome.generation = generation
            reason = getattr(generation, "finish_reason", None) or EngineFinish.CANCELLED
            metrics.generations.labels(finish_reason=str(reason)).inc()
            metrics.prompt_tokens.inc(generation.prompt_tokens)
            metrics.completion_tokens.inc(generation.completion_tokens)

    return run


def _finish(generation: GenerationLike | None) -> api.FinishReason:
    reason = getattr(generation, "finish_reason", None)
    if reason == EngineFinish.STOP:
        return api.FinishReason.STOP
    if reason == EngineFinish.LENGTH:
        return api.FinishReason.LENGTH
    raise OverloadedError(
        "the generation was cancelled because the agent is shutting down", retry_after_s=1
    )


def _usage(generation: GenerationLike | None) -> api.Usage:
    prompt = generation.prompt_tokens if generation else 0
    completion = generation.completion_tokens if generation else 0
    return api.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


class _SlotResponse(StreamingResponse):
    """A streamed answer that gives its scheduler slot back however the stream ends."""

    def __init__(self, content: AsyncIterator[str], stack: AsyncExitStack) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.headers["Cache-Control"] = "no-cache"
        self.headers["X-Accel-Buffering"] = "no"
        self._stack = stack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stack.aclose()


def _sse(payload: BaseModel | dict[str, Any]) -> str:
    data = (
        payload.model_dump_json(exclude_none=False)
        if isinstance(payload, BaseModel)
        else json.dumps(payload)
    )
    return f"data: {data}\n\n"


def _error_payload(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, DeadlineExceededError):
        kind, code = "timeout_error", "deadline_exceeded"
    elif isinstance(exc, OverloadedError):
        kind, code = "overloaded_error", "shutting_down"
    else:
        kind, code = "server_error", "internal_error"
        log.exception("generation failed", extra={"event": "generation_error"})
    message = str(exc) if code != "internal_error" else "the engine failed; see the agent's log"
    return api.ErrorBody(error=api.ErrorDetail(message=message, type=kind, code=code)).model_dump(
        mode="json"
    )


class _Timing:
    """First-token and per-token latency of one request, into the metrics."""

    def __init__(self, metrics: ServerMetrics, started: float) -> None:
        self._metrics = metrics
        self._started = started
        self._last: float | None = None

    def delta(self) -> None:
        now = time.monotonic()
        if self._last is None:
            self._metrics.first_token_s.observe(now - self._started)
        else:
            self._metrics.token_s.observe(now - self._last)
        self._last = now


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_client_leaves(request: Request, work: Awaitable[Any]) -> Any:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        raise _ClientGoneError
    return task.result()


# -- the app -------------------------------------------------------------------------------


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": api.ErrorBody, "description": text}
    for code, text in {
        400: "Invalid request; `param` names the field.",
        401: "Missing or wrong bearer token (TCP only).",
        404: "Unknown path.",
        405: "Method not allowed.",
        413: "Request body too large.",
        429: "Queue full; retry after `Retry-After` seconds.",
        500: "Internal error.",
        503: "Deadline exceeded, shutting down, or not ready.",
    }.items()
}


def create_app(state: ServerState) -> FastAPI:
    """Build the API around ``state`` (routes, error bodies, the gate, metrics)."""
    metrics = ServerMetrics(
        queue_depth=lambda: state.scheduler.queued,
        running=lambda: state.scheduler.running,
        model=lambda: _describe(state.holder.current()),
    )
    app = FastAPI(
        title="nanofleet agent inference API",
        version="1",
        summary="OpenAI-compatible local inference on the device.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.nanofleet = state
    app.state.metrics = metrics
    _install_error_handlers(app)
    _install_routes(app, state, metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(_Gate, state=state, metrics=metrics)
    return app


def _describe(engine: EngineLike) -> tuple[str, str, str]:
    return str(engine.manifest.name), str(engine.manifest.version), engine.bundle_hash


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(400, str(exc), param=exc.param, code="invalid_value")

    @app.exception_handler(_InvalidBodyError)
    async def _invalid_body(_: Request, exc: _InvalidBodyError) -> JSONResponse:
        return JSONResponse(exc.body.model_dump(mode="json"), status_code=400)

    @app.exception_handler(ContextLengthError)
    async def _context(request: Request, exc: ContextLengthError) -> JSONResponse:
        param = "prompt" if request.url.path == "/v1/completions" else "messages"
        if "max_tokens asks" in str(exc):
            param = "max_tokens"
        return error_response(400, str(exc), param=param, code="context_length_exceeded")

    @app.exception_handler(OverloadedError)
    async def _overloaded(_: Request, exc: OverloadedError) -> JSONResponse:
        return error_response(
            429,
            str(exc),
            kind="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(exc.retry_after_s)},
        )

    @app.exception_handler(DeadlineExceededError)
    async def _deadline(_: Request, exc: DeadlineExceededError) -> JSONResponse:
        return error_response(503, str(exc), kind="timeout_error", code="deadline_exceeded")

    @app.exception_handler(_ClientGoneError)
    async def _gone(_: Request, __: _ClientGoneError) -> Response:
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {
            404: "no such path; see /openapi.json",
            405: "method not allowed on this path",
        }.get(exc.status_code, str(exc.detail))
        return error_response(
            exc.status_code,
            message,
            code=codes.get(exc.status_code),
            headers=dict(exc.headers) if exc.headers else None,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        return error_response(
            400,
            f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid')}",
            param=".".join(loc) or None,
            code=str(first.get("type", "invalid")),
        )

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc, extra={"event": "internal_error"})
        return error_response(
            500, "internal error; see the agent's log", kind="server_error", code="internal"
        )


def _install_routes(app: FastAPI, state: ServerState, metrics: ServerMetrics) -> None:
    chat_body = _request_body("ChatCompletionRequest")
    completion_body = _request_body("CompletionRequest")
    # Before OpenAPI 3.2 the schema of an event stream describes one event.
    sse = {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "description": "One server-sent event: `data` is a JSON-encoded chunk "
                "(ChatCompletionChunk or CompletionChunk), or `[DONE]` at the end.",
                "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                "required": ["data"],
            }
        }
    }

    @app.post(
        "/v1/chat/completions",
        response_model=api.ChatCompletionResponse,
        responses={200: {"content": sse}, **_ERRORS},
        openapi_extra=chat_body,
        summary="Create a chat completion (SSE when stream is true).",
    )
    async def chat_completions(request: Request) -> Response:
        req = _parse(api.ChatCompletionRequest, await request.body())
        return await _generate(request, req, state, metrics)

    @app.post(
        "/v1/completions",
        response_model=api.CompletionResponse,
        responses={200: {"content": sse}, **_ERRORS},
        openapi_extra=completion_body,
        summary="Create a text completion from a raw prompt (SSE when stream is true).",
    )
    async def completions(request: Request) -> Response:
        req = _parse(api.CompletionRequest, await request.body())
        return await _generate(request, req, state, metrics)

    @app.get("/v1/models", response_model=api.ModelList, responses=_ERRORS)
    async def models() -> api.ModelList:
        engine = state.holder.current()
        card = api.ModelCard(
            id=_model_id(engine),
            created=int(state.holder.activated_at),
            owned_by=OWNED_BY,
        )
        return api.ModelList(data=[card])

    @app.get("/healthz", responses=_ERRORS, summary="The process is alive.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses=_ERRORS, summary="The model is loaded and answering.")
    async def readyz() -> Response:
        if not state.ready.is_set():
            return error_response(
                503, "the model is not ready yet", kind="overloaded_error", code="not_ready"
            )
        return JSONResponse({"status": "ready"})

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}},
            **_ERRORS,
        },
        summary="Prometheus metrics.",
    )
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)


async def _generate(
    request: Request,
    req: api.ChatCompletionRequest | api.CompletionRequest,
    state: ServerState,
    metrics: ServerMetrics,
) -> Response:
    started = time.monotonic()
    job = _plan(req, state.holder.current(), state.limits)
    stack = AsyncExitStack()
    try:
        slot = await stack.enter_async_context(state.scheduler.admit())
    except BaseException:
        await stack.aclose()
        raise
    completion_id = (
        "chatcmpl-" if isinstance(req, api.ChatCompletionRequest) else "cmpl-"
    ) + uuid.uuid4().hex
    created = int(time.time())
    outcome = _Outcome()
    timing = _Timing(metrics, started)
    deltas = slot.stream(_work(job, outcome, metrics))

    def answered() -> None:
        if state.on_chat_turn is not None and isinstance(req, api.ChatCompletionRequest):
            state.on_chat_turn(req.messages)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if isinstance(req, api.ChatCompletionRequest):
            events = _chat_events(
                deltas, job, completion_id, created, outcome, timing, include_usage, answered
            )
        else:
            events = _completion_events(
                deltas, job, completion_id, created, outcome, timing, include_usage
            )
        return _SlotResponse(events, stack)
    async with stack:

        async def collect() -> str:
            parts = []
            async for delta in deltas:
                timing.delta()
                parts.append(delta)
            return "".join(parts)

        text = await _unless_client_leaves(request, collect())
    answered()
    finish = _finish(outcome.generation)
    usage = _usage(outcome.generation)
    if isinstance(req, api.ChatCompletionRequest):
        return JSONResponse(
            api.ChatCompletionResponse(
                id=completion_id,
                created=created,
                model=job.model_id,
                choices=[
                    api.ChatChoice(
                        index=0, message=api.AssistantMessage(content=text), finish_reason=finish
                    )
                ],
                usage=usage,
            ).model_dump(mode="json")
        )
    return JSONResponse(
        api.CompletionResponse(
            id=completion_id,
            created=created,
            model=job.model_id,
            choices=[api.CompletionChoice(index=0, text=text, finish_reason=finish)],
            usage=usage,
        ).model_dump(mode="json")
    )


async def _chat_events(
    deltas: AsyncIterator[str],
    job: _Job,
    completion_id: str,
    created: int,
    outcome: _Outcome,
    timing: _Timing,
    include_usage: bool,
    answered: Callable[[], None],
) -> AsyncIterator[str]:
    def chunk(delta: api.ChatDelta, finish: api.FinishReason | None = None) -> str:
        return _sse(
            api.ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=job.model_id,
                choices=[api.ChatChunkChoice(index=0, delta=delta, finish_reason=finish)],
            )
        )

    yield chunk(api.ChatDelta(role="assistant", content=""))
    try:
        async for text in deltas:
            timing.delta()
            yield chunk(api.ChatDelta(content=text))
        finish = _finish(outcome.generation)
    except Exception as e:
        yield _sse(_error_payload(e))
        return
    yield chunk(api.ChatDelta(), finish)
    answered()
    if include_usage:
        yield _sse(
            api.ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=job.model_id,
                choices=[],
                usage=_usage(outcome.generation),
            )
        )
    yield "data: [DONE]\n\n"


async def _completion_events(
    deltas: AsyncIterator[str],
    job: _Job,
    completion_id: str,
    created: int,
    outcome: _Outcome,
    timing: _Timing,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(text: str, finish: api.FinishReason | None = None) -> str:
        return _sse(
            api.CompletionChunk(
                id=completion_id,
                created=created,
                model=job.model_id,
                choices=[api.CompletionChoice(index=0, text=text, finish_reason=finish)],
            )
        )

    try:
        async for text in deltas:
            timing.delta()
            yield chunk(text)
        finish = _finish(outcome.generation)
    except Exception as e:
        yield _sse(_error_payload(e))
        return
    yield chunk("", finish)
    if include_usage:
        yield _sse(
            api.CompletionChunk(
                id=completion_id,
                created=created,
                model=job.model_id,
                choices=[],
                usage=_usage(outcome.generation),
            )
        )
    yield "data: [DONE]\n\n"


# -- the OpenAPI document ------------------------------------------------------------------


def _request_body(name: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
    }


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        routes=app.routes,
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (api.ChatCompletionRequest, api.CompletionRequest):
        schema = model.model_json_schema(
            ref_template="#/components/schemas/{model}", mode="validation"
        )
        for name, sub in schema.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas[model.__name__] = schema
    app.openapi_schema = doc
    return doc
