"""The local REST daemon: OpenAI-compatible completions plus routes for agents."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_infer.cache_store import InvalidAgentName, validate_agent_name
from edge_infer.engine import Engine
from edge_infer.errors import ContextLengthError, EdgeInferError
from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.sequence import Usage
from edge_infer.server import protocol
from edge_infer.server.guard import DEFAULT_MAX_BODY_BYTES, RequestGuard
from edge_infer.server.prefix_pool import PrefixPool
from edge_infer.server.scheduler import Cancelled, Job, Scheduler, ShuttingDown, Task
from edge_infer.server.tasks import StatelessTask, agent_task

log = logging.getLogger("edge_infer.server")

AGENT_HEADER = "x-agent-id"
DEFAULT_MAX_TOKENS = 512
DISCONNECT_POLL_S = 0.25
PUBLIC_PATHS = ("/health",)

# What each error status means, as the OpenAPI schema documents it.
ERROR_MEANING = {
    400: "Invalid request: malformed JSON or fields, a prompt longer than the context, a bad "
    "agent id (the error names the field)",
    401: "Missing or wrong API key",
    403: "The request's Host or Origin is not this machine (served without an API key)",
    404: "No such agent",
    409: "An agent of that name already exists",
    413: "The request body is larger than the server's limit",
    503: "The server is shutting down",
}
SSE_RESPONSE = {
    200: {
        "description": "The completion as JSON, or with `stream: true` as server-sent events: "
        '`data: {chunk JSON}` lines, an error chunk `data: {"error": ...}` if generation '
        "fails, and `data: [DONE]` at the end",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


class ApiError(Exception):
    """An error answered with OpenAI-style JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.param = param


def _error_response(
    status: int, message: str, kind: str, code: str | None, param: str | None = None
) -> JSONResponse:
    return JSONResponse(protocol.error_json(message, kind, code, param), status_code=status)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses a route answers."""
    return {s: {"model": protocol.ErrorResponse, "description": ERROR_MEANING[s]} for s in statuses}


def _as_api_error(exc: BaseException) -> ApiError:
    """Our exceptions, mapped to HTTP errors a client can act on."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, InvalidAgentName):
        return ApiError(400, str(exc), code="invalid_agent_id")
    if isinstance(exc, (ValueError, TypeError)):
        return ApiError(400, str(exc))
    if isinstance(exc, Cancelled):
        return ApiError(503, "the request was cancelled (server stopping)", "server_error")
    if isinstance(exc, ShuttingDown):
        return ApiError(503, "the server is shutting down", "server_error", "shutting_down")
    if isinstance(exc, EdgeInferError):
        return ApiError(400, str(exc))
    log.exception("request failed", exc_info=exc)
    return ApiError(500, f"internal error: {exc}", "server_error")


class Service:
    """What the routes share: the engine, the scheduler and the stateless prefix caches."""

    def __init__(self, engine: Engine, model_id: str, max_active: int = 8) -> None:
        self.engine = engine
        self.model_id = model_id
        self.scheduler = Scheduler(engine.runner, max_active=max_active)
        self.prefix_pool = PrefixPool(engine.runner.new_cache, max_slots=2)
        self.preparing = 0  # requests whose prompt is being rendered and tokenized

    async def prepare(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` (rendering, tokenizing) on a worker thread: a long prompt takes
        seconds, and the event loop must keep answering other requests meanwhile."""
        self.preparing += 1
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as exc:
            raise _as_api_error(exc) from None
        finally:
            self.preparing -= 1

    def stats(self) -> dict[str, int]:
        """Requests being prepared, decoding (active) and queued (waiting)."""
        return {"preparing": self.preparing, **self.scheduler.stats()}

    def submit(self, key: str, make: Callable[[], Task]) -> Job:
        job = Job(key=key, make=make, loop=asyncio.get_running_loop())
        try:
            return self.scheduler.submit(job)
        except ShuttingDown as exc:
            raise _as_api_error(exc) from None

    def submit_agent(
        self, name: str, messages: list[dict[str, Any]], params: SamplingParams
    ) -> Job:
        return self.submit(name, lambda: agent_task(self.engine, name, messages, params))

    def submit_stateless(self, ids: list[int], params: SamplingParams) -> Job:
        return self.submit(
            protocol.new_id("stateless"),
            lambda: StatelessTask(self.engine.runner, self.prefix_pool, ids, params),
        )


async def _next_event(job: Job, request: Request) -> tuple[str, Any]:
    """The job's next event; cancels the job if the client goes away while waiting."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise ApiError(499, "client disconnected") from None


async def _first_event(job: Job, request: Request) -> tuple[str, Any]:
    """Wait for the first piece (so errors before generation get a proper status code)."""
    try:
        kind, value = await _next_event(job, request)
    except BaseException:
        job.cancel()
        raise
    if kind == "error":
        raise _as_api_error(value)
    return kind, value


async def _collect(job: Job, request: Request, first: tuple[str, Any]) -> tuple[str, Usage]:
    pieces: list[str] = []
    kind, value = first
    try:
        while kind == "text":
            pieces.append(value)
            kind, value = await _next_event(job, request)
    except BaseException:
        job.cancel()
        raise
    if kind == "error":
        raise _as_api_error(value)
    return "".join(pieces), value


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream_events(
    job: Job,
    first: tuple[str, Any],
    on_text: Callable[[str], dict[str, Any]],
    on_done: Callable[[Usage], list[dict[str, Any]]],
) -> AsyncIterator[str]:
    """SSE lines for a job; a client that goes away cancels it (its cache stays consistent)."""
    kind, value = first
    try:
        while True:
            if kind == "text":
                yield _sse(on_text(value))
            elif kind == "done":
                for chunk in on_done(value):
                    yield _sse(chunk)
                yield "data: [DONE]\n\n"
                return
            else:
                err = _as_api_error(value)
                yield _sse(protocol.error_json(err.message, err.kind, err.code))
                return
            kind, value = await job.events.get()
    finally:
        job.cancel()  # no-op when finished; stops generation if the client disconnected


def _agent_from(request: Request, body_agent: str | None) -> str | None:
    name = request.headers.get(AGENT_HEADER) or body_agent
    if name is None:
        return None
    try:
        return validate_agent_name(name)
    except InvalidAgentName as exc:
        raise ApiError(400, str(exc), code="invalid_agent_id") from None


def _agent_json(info: Any) -> dict[str, Any]:
    d = asdict(info)
    return {"id": d.pop("name"), "object": "agent", **d}


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    model_id: str | None = None,
    max_active: int = 8,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving ``engine``; with ``api_key`` every route but /health needs it,
    without one only requests addressed to this machine are served (see :class:`RequestGuard`).
    Request bodies over ``max_body_bytes`` are refused."""
    service = Service(engine, model_id or engine.model.name, max_active=max_active)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        log.info("shutting down: stopping generations and saving agents' caches")
        await asyncio.to_thread(service.scheduler.stop, 30.0)
        await asyncio.to_thread(engine.flush)

    app = FastAPI(title="edge-infer", lifespan=lifespan)
    app.state.service = service

    app.add_middleware(
        RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes, public_paths=PUBLIC_PATHS
    )
    guarded = (401,) if api_key else (403,)
    public = () if api_key else (403,)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.kind, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        param = None
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            param = param or loc or None
            if e.get("type") == "json_invalid":
                problems.append("the body is not valid JSON")
            elif not loc and e.get("type") in ("model_attributes_type", "dict_type"):
                problems.append("the body must be a JSON object")
            else:
                msg = str(e.get("msg")).removeprefix("Value error, ")
                problems.append(f"{loc}: {msg}" if loc else msg)
        message = "invalid request: " + "; ".join(problems)
        body = protocol.error_json(message, "invalid_request_error", None, param)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "request_too_large" if exc.status_code == 413 else None
        return _error_response(exc.status_code, str(exc.detail), kind, code)

    async def _mapped(request: Request, exc: Exception) -> JSONResponse:
        e = _as_api_error(exc)
        return _error_response(e.status, e.message, e.kind, e.code)

    app.add_exception_handler(EdgeInferError, _mapped)
    app.add_exception_handler(ValueError, _mapped)
    # anything else is our fault: still an error JSON, never a plain-text page
    app.add_exception_handler(Exception, _mapped)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, less the 422 it assumes: validation errors are 400s here."""
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, routes=app.routes, description=app.description
            )
            for path in schema["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # -- info --------------------------------------------------------------------------------
    @app.get("/health", responses=_errors(*public))
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": service.model_id,
            "backend": f"{engine.backend.name}/{engine.backend.device}",
            **service.stats(),
        }

    @app.get("/v1/models", responses=_errors(*guarded))
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": service.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "edge-infer",
                    "context_length": engine.context_length,
                }
            ],
        }

    # -- completions --------------------------------------------------------------------
    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={**SSE_RESPONSE, **_errors(400, *guarded, 413, 503)},
    )
    async def chat_completions(
        req: protocol.ChatCompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        params = req.sampling(DEFAULT_MAX_TOKENS)
        messages = req.message_dicts()
        agent = _agent_from(request, req.agent)
        if agent is not None:
            job = service.submit_agent(agent, messages, params)
        else:
            job = service.submit_stateless(await service.prepare(engine.chat_ids, messages), params)
        rid = protocol.new_id("chatcmpl")
        first = await _first_event(job, request)
        if not req.stream:
            text, usage = await _collect(job, request, first)
            return JSONResponse(protocol.chat_completion(rid, service.model_id, text, usage))

        model = service.model_id
        opened = [False]

        def on_text(text: str) -> dict[str, Any]:
            delta = {"content": text} if opened[0] else {"role": "assistant", "content": text}
            opened[0] = True
            return protocol.chat_chunk(rid, model, delta)

        def on_done(usage: Usage) -> list[dict[str, Any]]:
            delta = {} if opened[0] else {"role": "assistant", "content": ""}
            chunks = [protocol.chat_chunk(rid, model, delta, usage.finish_reason or "stop")]
            if req.include_usage:
                chunks.append(protocol.chat_chunk(rid, model, None, usage=usage))
            return chunks

        return StreamingResponse(
            _stream_events(job, first, on_text, on_done), media_type="text/event-stream"
        )

    @app.post(
        "/v1/completions",
        response_model=None,
        responses={**SSE_RESPONSE, **_errors(400, *guarded, 413, 503)},
    )
    async def completions(
        req: protocol.CompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        if _agent_from(request, req.agent) is not None:
            raise ApiError(
                400,
                "agents hold conversations: use /v1/chat/completions with an agent "
                "(/v1/completions is stateless)",
                param="agent",
            )
        params = req.sampling(DEFAULT_MAX_TOKENS)
        ids = await service.prepare(engine.tokenize, req.prompt_text())
        job = service.submit_stateless(ids, params)
        rid = protocol.new_id("cmpl")
        model = service.model_id
        first = await _first_event(job, request)
        if not req.stream:
            text, usage = await _collect(job, request, first)
            return JSONResponse(
                protocol.completion(rid, model, text, usage.finish_reason or "stop", usage)
            )

        def on_done(usage: Usage) -> list[dict[str, Any]]:
            last = protocol.completion(rid, model, "", usage.finish_reason or "stop")
            if req.include_usage:
                last["usage"] = protocol.usage_json(usage)
            return [last]

        return StreamingResponse(
            _stream_events(job, first, lambda t: protocol.completion(rid, model, t, None), on_done),
            media_type="text/event-stream",
        )

    # -- agents ------------------------------------------------------------------------
    def _info(name: str) -> dict[str, Any]:
        for info in engine.agents():
            if info.name == name:
                return _agent_json(info)
        raise ApiError(404, f"agent {name!r} not found", "not_found_error", "agent_not_found")

    def _existing(name: str) -> str:
        try:
            validate_agent_name(name)
        except InvalidAgentName as exc:
            raise ApiError(400, str(exc), code="invalid_agent_id") from None
        if not engine.has_agent(name):
            raise ApiError(404, f"agent {name!r} not found", "not_found_error", "agent_not_found")
        return name

    @app.get("/v1/agents", responses=_errors(*guarded))
    def list_agents() -> dict[str, Any]:
        return {"object": "list", "data": [_agent_json(a) for a in engine.agents()]}

    @app.get("/v1/agents/{agent_id}", responses=_errors(400, *guarded, 404))
    def get_agent(agent_id: str) -> dict[str, Any]:
        name = _existing(agent_id)
        agent = engine.agent(name)
        return {**_info(name), "system": agent.system, "conversation": agent.messages}

    @app.delete("/v1/agents/{agent_id}", responses=_errors(400, *guarded, 404))
    def delete_agent(agent_id: str) -> dict[str, Any]:
        name = _existing(agent_id)
        engine.delete_agent(name)
        return {"id": name, "object": "agent.deleted", "deleted": True}

    @app.post(
        "/v1/agents/{agent_id}/fork",
        status_code=201,
        responses=_errors(400, *guarded, 404, 409, 413),
    )
    def fork_agent(agent_id: str, req: protocol.ForkRequest) -> dict[str, Any]:
        name = _existing(agent_id)
        try:
            validate_agent_name(req.name)
        except InvalidAgentName as exc:
            raise ApiError(400, str(exc), code="invalid_agent_id") from None
        if engine.has_agent(req.name):
            raise ApiError(409, f"agent {req.name!r} already exists", code="agent_exists")
        engine.agent(name).fork(req.name)
        return _info(req.name)

    return app
