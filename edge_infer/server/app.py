"""The local REST daemon: OpenAI-compatible completions plus routes for agents."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_infer.agents.images import ImagePrompt, image_parts
from edge_infer.cache_store import InvalidAgentName, validate_agent_name
from edge_infer.engine import Engine
from edge_infer.errors import ContextLengthError, EdgeInferError
from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.sequence import TokenLogprob, Usage
from edge_infer.server import anthropic, protocol
from edge_infer.server.guard import DEFAULT_MAX_BODY_BYTES, RequestGuard
from edge_infer.server.images import image_resolver
from edge_infer.server.metrics import CONTENT_TYPE, CountRequests, Metrics
from edge_infer.server.prefix_pool import PrefixPool
from edge_infer.server.scheduler import Cancelled, Job, Scheduler, ShuttingDown
from edge_infer.server.structured import (
    CallSplitter,
    OutputPlan,
    RequestError,
    call_deltas,
    plan_output,
)
from edge_infer.server.tasks import (
    Delta,
    Inner,
    Reply,
    StatelessTask,
    agent_task,
    prefix_task,
    prompt_cache_name,
)

log = logging.getLogger("edge_infer.server")

AGENT_HEADER = "x-agent-id"
DEFAULT_MAX_TOKENS = 512
DISCONNECT_POLL_S = 0.25
PUBLIC_PATHS = ("/health",)
# The request fields each route honours; any other is refused (README: the Serve section).
HONOURED = {
    "/v1/chat/completions": protocol.honoured_fields(protocol.ChatCompletionRequest),
    "/v1/completions": protocol.honoured_fields(protocol.CompletionRequest),
    "/v1/messages": protocol.honoured_fields(anthropic.MessagesRequest),
    "/v1/messages/count_tokens": protocol.honoured_fields(anthropic.CountTokensRequest),
}
ANTHROPIC_PATHS = ("/v1/messages",)
# our error types in Anthropic's words
ANTHROPIC_KINDS = {"server_error": "api_error", "invalid_request_error": "invalid_request_error"}

# What each error status means, as the OpenAPI schema documents it.
ERROR_MEANING = {
    400: "Invalid request: malformed JSON or fields, a prompt longer than the context, a bad "
    "agent id (the error names the field)",
    401: "Missing or wrong API key",
    403: "The request's Host or Origin is not this machine (served without an API key)",
    404: "No such agent",
    409: "An agent of that name already exists",
    413: "The request body is larger than the server's limit",
    503: "The model is still loading, or the server is shutting down",
}
SSE_RESPONSE = {
    200: {
        "description": "The completion as JSON, or with `stream: true` as server-sent events: "
        '`data: {chunk JSON}` lines, an error chunk `data: {"error": ...}` if generation '
        "fails, and `data: [DONE]` at the end",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}
ANTHROPIC_SSE_RESPONSE = {
    200: {
        "description": "The message as JSON, or with `stream: true` as Anthropic's server-sent "
        "events (`event: message_start`, `content_block_start`, `content_block_delta`, "
        "`content_block_stop`, `message_delta`, `message_stop`; `error` if generation fails)",
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
    status: int,
    message: str,
    kind: str,
    code: str | None,
    param: str | None = None,
    request: Request | None = None,
) -> JSONResponse:
    """The error as JSON: OpenAI's shape, or Anthropic's on the Messages routes."""
    if request is not None and request.url.path.startswith(ANTHROPIC_PATHS):
        body = anthropic.error_json(message, ANTHROPIC_KINDS.get(kind, kind))
        return JSONResponse(body, status_code=status)
    return JSONResponse(protocol.error_json(message, kind, code, param), status_code=status)


def _errors(*statuses: int, model: Any = protocol.ErrorResponse) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses a route answers (``model``: the body)."""
    return {s: {"model": model, "description": ERROR_MEANING[s]} for s in statuses}


def _as_api_error(exc: BaseException) -> ApiError:
    """Our exceptions, mapped to HTTP errors a client can act on."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError):
        return ApiError(400, str(exc), param=exc.param)
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
    """What the routes share: the engine, the scheduler, the stateless prefix caches and
    the metrics."""

    def __init__(
        self,
        engine: Engine,
        model_id: str,
        metrics: Metrics,
        max_active: int = 8,
        image_folders: Sequence[Path] = (),
    ) -> None:
        self.engine = engine
        # a request's image URLs as data: URIs (checked; local files only from these folders)
        self.resolve_image = image_resolver(image_folders, engine.vision is not None)
        self.model_id = model_id
        self.metrics = metrics
        self.scheduler = Scheduler(
            engine.runner, max_active=max_active, on_step=metrics.batch_size.observe
        )
        self.prefix_pool = PrefixPool(engine.runner.new_cache, max_slots=2)
        self.preparing = 0  # requests whose prompt is being rendered and tokenized
        metrics.watch_agents(engine.agents)

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

    def submit(self, key: str, make: Callable[[], Inner], top: int | None) -> Job:
        """Queue a request's task (built on the worker thread) as a job answering deltas."""
        job = Job(key=key, make=lambda: Reply(make(), top), loop=asyncio.get_running_loop())
        try:
            return self.scheduler.submit(job)
        except ShuttingDown as exc:
            raise _as_api_error(exc) from None

    def _timed(self, start: Callable[[], Inner]) -> Inner:
        t0 = time.perf_counter()
        task = start()
        self.metrics.restore.observe(time.perf_counter() - t0)
        return task

    def submit_agent(
        self,
        name: str,
        messages: list[dict[str, Any]],
        params: SamplingParams,
        top: int | None,
        plan: OutputPlan | None = None,
    ) -> Job:
        plan = plan or OutputPlan()

        def start() -> Inner:
            return agent_task(self.engine, name, messages, params, plan.tools, plan.call_format)

        return self.submit(name, lambda: self._timed(start), top)

    def submit_prompt_cache(
        self,
        key: str,
        ids: list[int],
        params: SamplingParams,
        top: int | None,
        tool_format: str | None = None,
        images: ImagePrompt | None = None,
    ) -> Job:
        name = prompt_cache_name(key)

        def start() -> Inner:
            return prefix_task(self.engine, name, ids, params, tool_format, images)

        return self.submit(name, lambda: self._timed(start), top)

    def submit_stateless(
        self,
        ids: list[int],
        params: SamplingParams,
        top: int | None,
        tool_format: str | None = None,
        images: ImagePrompt | None = None,
    ) -> Job:
        return self.submit(
            protocol.new_id("stateless"),
            lambda: StatelessTask(
                self.engine.runner, self.prefix_pool, ids, params, tool_format, images
            ),
            top,
        )

    async def start_chat(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams,
        plan: OutputPlan,
        agent: str | None,
        prompt_cache_key: str | None = None,
        top: int | None = None,
        visual: tuple[float | None, str | None] = (None, None),
    ) -> Job:
        """Queue a chat reply: an agent's turn, a turn on a prompt cache, or stateless (on
        the shared prefix caches). ``visual``: this request's image-token budget and
        dropping method (None: the server's)."""
        if plan.grammar is not None:
            params = SamplingParams.from_kwargs(params, grammar=plan.grammar)
        if any(image_parts(m) for m in messages):
            check_image_request(agent, visual)
            if agent is None:
                prompt = await self.prepare(self.image_prompt, messages, plan, visual)
                if prompt_cache_key is not None:
                    return self.submit_prompt_cache(
                        prompt_cache_key, prompt.ids, params, top, plan.call_format, prompt
                    )
                return self.submit_stateless(prompt.ids, params, top, plan.call_format, prompt)
        if agent is not None:
            return self.submit_agent(agent, messages, params, top, plan)
        ids = await self.prepare(self.chat_ids, messages, plan)
        if prompt_cache_key is not None:
            return self.submit_prompt_cache(prompt_cache_key, ids, params, top, plan.call_format)
        return self.submit_stateless(ids, params, top, plan.call_format)

    def image_prompt(
        self,
        messages: list[dict[str, Any]],
        plan: OutputPlan,
        visual: tuple[float | None, str | None] = (None, None),
    ) -> ImagePrompt:
        """A chat with images as one prompt, with the plan's tools rendered in."""
        rate, method = visual
        return self.engine.image_chat(messages, rate, method, tools=plan.tools)

    def chat_ids(self, messages: list[dict[str, Any]], plan: OutputPlan) -> list[int]:
        """The prompt's token ids (an image counts the tokens dropping keeps of it)."""
        if any(image_parts(m) for m in messages):
            return self.image_prompt(messages, plan).ids
        return self.engine.runner.chat_ids(messages, tools=plan.tools)


def check_image_request(agent: str | None, visual: tuple[float | None, str | None]) -> None:
    """Refuse what a request with images asks for but would not get."""
    if agent is not None and visual != (None, None):
        field = "visual_budget" if visual[0] is not None else "visual_method"
        raise ApiError(
            400,
            f"{field}: an agent's images are encoded with the server's settings "
            "(--visual-budget, --visual-method); send it without an agent",
            param=field,
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


async def _collect(
    job: Job, request: Request, first: tuple[str, Any]
) -> tuple[str, list[TokenLogprob], Usage]:
    """The whole reply: its text, the log-probabilities of its tokens, its usage."""
    pieces: list[str] = []
    logprobs: list[TokenLogprob] = []
    kind, value = first
    try:
        while kind == "text":
            pieces.append(value.text)
            logprobs += value.logprobs
            kind, value = await _next_event(job, request)
    except BaseException:
        job.cancel()
        raise
    if kind == "error":
        raise _as_api_error(value)
    return "".join(pieces), logprobs, value


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _reply(job: Job) -> Reply:
    """The finished job's reply (its task, once the worker is done with it)."""
    if not isinstance(job.task, Reply):
        raise RuntimeError("the job has no reply")
    return job.task


async def _stream_events(
    job: Job,
    first: tuple[str, Any],
    on_delta: Callable[[Delta], dict[str, Any] | None],
    on_done: Callable[[Usage], list[dict[str, Any]]],
) -> AsyncIterator[str]:
    """SSE lines for a job; a client that goes away cancels it (its cache stays consistent).
    ``on_delta`` may hold a delta back (None)."""
    kind, value = first
    try:
        while True:
            if kind == "text":
                chunk = on_delta(value)
                if chunk is not None:
                    yield _sse(chunk)
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
    engine: Engine | Callable[[], Engine],
    *,
    api_key: str | None = None,
    model_id: str | None = None,
    max_active: int = 8,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_load_error: Callable[[BaseException], None] | None = None,
    image_folders: Sequence[Path] = (),
) -> FastAPI:
    """The FastAPI app serving ``engine``; with ``api_key`` every route but /health needs it,
    without one only requests addressed to this machine are served (see :class:`RequestGuard`).
    Request bodies over ``max_body_bytes`` are refused. Images given as local paths are read
    only from inside ``image_folders``.

    ``engine`` may be a function that loads it: the app then starts at once and loads the
    model on a thread, answering 503 ``loading`` (``/health`` included) until it is ready;
    a failed load is handed to ``on_load_error``.
    """
    metrics = Metrics()
    services: list[Service] = []  # the one Service, once the engine is there
    stopping = threading.Event()

    def start(eng: Engine) -> None:
        services.append(
            Service(eng, model_id or eng.model.name, metrics, max_active, image_folders)
        )

    def load(loader: Callable[[], Engine]) -> None:
        try:
            eng = loader()
        except BaseException as exc:  # reported by whoever runs the app
            log.debug("loading the model failed", exc_info=exc)
            if on_load_error is not None:
                on_load_error(exc)
            return
        if not stopping.is_set():
            start(eng)

    def ready() -> Service:
        if not services:
            raise ApiError(503, "the model is still loading", "server_error", "model_loading")
        return services[0]

    if isinstance(engine, Engine):
        start(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not isinstance(engine, Engine):
            loader = threading.Thread(target=load, args=(engine,), name="edge-infer-load")
            loader.daemon = True  # a stop while loading does not wait for the load
            loader.start()
        yield
        stopping.set()
        if services:
            log.info("shutting down: stopping generations and saving agents' caches")
            await asyncio.to_thread(services[0].scheduler.stop, 30.0)
            await asyncio.to_thread(services[0].engine.flush)

    app = FastAPI(title="edge-infer", lifespan=lifespan)

    app.add_middleware(
        RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes, public_paths=PUBLIC_PATHS
    )
    app.add_middleware(CountRequests, metrics=metrics, routes=app.router.routes)
    guarded = (401,) if api_key else (403,)
    public = () if api_key else (403,)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.kind, exc.code, exc.param, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems, unsupported = [], []
        param = None
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            param = param or loc or None
            if e.get("type") == "extra_forbidden":
                unsupported.append(loc)
            elif e.get("type") == "json_invalid":
                problems.append("the body is not valid JSON")
            elif not loc and e.get("type") in ("model_attributes_type", "dict_type"):
                problems.append("the body must be a JSON object")
            else:
                msg = str(e.get("msg")).removeprefix("Value error, ")
                problems.append(f"{loc}: {msg}" if loc else msg)
        if unsupported:
            honoured = HONOURED.get(request.url.path)
            message = (
                f"unsupported parameter{'s' if len(unsupported) > 1 else ''}: "
                f"{', '.join(unsupported)} (this server refuses what it would not honour"
                + (f"; it honours {', '.join(honoured)})" if honoured else ")")
            )
            return _error_response(
                400,
                message,
                "invalid_request_error",
                "unsupported_parameter",
                unsupported[0],
                request,
            )
        message = "invalid request: " + "; ".join(problems)
        return _error_response(400, message, "invalid_request_error", None, param, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "request_too_large" if exc.status_code == 413 else None
        return _error_response(exc.status_code, str(exc.detail), kind, code, request=request)

    async def _mapped(request: Request, exc: Exception) -> JSONResponse:
        e = _as_api_error(exc)
        return _error_response(e.status, e.message, e.kind, e.code, e.param, request)

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
    @app.get("/health", responses=_errors(*public, 503))
    async def health() -> JSONResponse:
        if not services:
            return JSONResponse({"status": "loading"}, status_code=503)
        service = services[0]
        eng = service.engine
        return JSONResponse(
            {
                "status": "ok",
                "model": service.model_id,
                "backend": f"{eng.backend.name}/{eng.backend.device}",
                **service.stats(),
            }
        )

    @app.get("/metrics", responses=_errors(*guarded))
    def prometheus_metrics() -> Response:
        """Prometheus text format: requests, tokens, latencies, agents, batch sizes."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", responses=_errors(*guarded, 503))
    async def list_models() -> dict[str, Any]:
        service = ready()
        return {
            "object": "list",
            "data": [
                {
                    "id": service.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "edge-infer",
                    "context_length": service.engine.context_length,
                }
            ],
        }

    # -- completions --------------------------------------------------------------------
    def _finished(usage: Usage) -> Usage:
        metrics.finished(usage)
        return usage

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={**SSE_RESPONSE, **_errors(400, *guarded, 413, 503)},
    )
    async def chat_completions(
        req: protocol.ChatCompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        service = ready()
        eng = service.engine
        params = req.sampling(DEFAULT_MAX_TOKENS)
        messages = await service.prepare(req.message_dicts, service.resolve_image)
        agent = _agent_from(request, req.agent)
        top = req.logprobs_top()
        if agent is not None and req.prompt_cache_key is not None:
            raise ApiError(
                400,
                "an agent keeps its own cache: send agent or prompt_cache_key, not both",
                param="prompt_cache_key",
            )
        plan = await service.prepare(
            lambda: plan_output(
                eng.tokenizer,
                response_format=req.response_format,
                gbnf=req.grammar,
                tools=req.tools,
                tool_choice=req.tool_choice,
                parallel_tool_calls=req.parallel_tool_calls,
            )
        )
        visual = (req.visual_budget, req.visual_method)
        job = await service.start_chat(
            messages, params, plan, agent, req.prompt_cache_key, top, visual
        )
        rid = protocol.new_id("chatcmpl")
        token_bytes = eng.tokenizer.token_bytes
        first = await _first_event(job, request)
        if not req.stream:
            _, logprobs, usage = await _collect(job, request, first)
            text, calls = _reply(job).reply()
            lp = protocol.chat_logprobs(logprobs, token_bytes) if top is not None else None
            body = protocol.chat_completion(
                rid, service.model_id, text, _finished(usage), lp, calls
            )
            return JSONResponse(body)

        model = service.model_id
        opened = [False]
        splitter = CallSplitter(plan.call_format, plan.requires_call)

        def chunk(delta: dict[str, Any], **kw: Any) -> dict[str, Any]:
            if not opened[0]:
                delta = {"role": "assistant", **delta}
                opened[0] = True
            return protocol.chat_chunk(rid, model, delta, **kw)

        def on_delta(d: Delta) -> dict[str, Any] | None:
            text = splitter.feed(d.text)
            lp = protocol.chat_logprobs(d.logprobs, token_bytes) if top is not None else None
            if not text and lp is None:
                return None
            return chunk({"content": text}, logprobs=lp)

        def on_done(usage: Usage) -> list[dict[str, Any]]:
            _finished(usage)
            text, calls = _reply(job).reply()
            chunks = []
            rest = splitter.rest(text, calls)
            if rest or not opened[0]:
                chunks.append(chunk({"content": rest}))
            for delta in call_deltas(calls):
                chunks.append(chunk({"tool_calls": delta}))
            reason = "tool_calls" if calls else usage.finish_reason or "stop"
            chunks.append(protocol.chat_chunk(rid, model, {}, reason))
            if req.include_usage:
                chunks.append(protocol.chat_chunk(rid, model, None, usage=usage))
            return chunks

        return StreamingResponse(
            _stream_events(job, first, on_delta, on_done), media_type="text/event-stream"
        )

    # -- Anthropic's Messages API -------------------------------------------------------
    def _anthropic_plan(
        eng: Engine, tools: list[dict[str, Any]] | None, choice: anthropic.ToolChoice | None
    ) -> OutputPlan:
        return plan_output(
            eng.tokenizer,
            tools=tools,
            tool_choice=choice.openai() if choice is not None else None,
            parallel_tool_calls=False,
        )

    @app.post(
        "/v1/messages",
        response_model=None,
        responses={
            **ANTHROPIC_SSE_RESPONSE,
            **_errors(400, *guarded, 413, 503, model=anthropic.AnthropicErrorResponse),
        },
    )
    async def messages(
        req: anthropic.MessagesRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        """Anthropic's Messages API: the same model, agents (by header) and caches."""
        service = ready()
        eng = service.engine
        chat = await service.prepare(req.chat_messages, service.resolve_image)
        plan = await service.prepare(_anthropic_plan, eng, req.openai_tools(), req.tool_choice)
        params = SamplingParams.from_kwargs(
            None,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            stop=req.stop_sequences,
        )
        job = await service.start_chat(chat, params, plan, _agent_from(request, None))
        model = service.model_id
        first = await _first_event(job, request)
        if not req.stream:
            _, _, usage = await _collect(job, request, first)
            reply = _reply(job)
            text, calls = reply.reply()
            stopped_by = reply.stopped_by(params.stop)
            return JSONResponse(anthropic.message(model, text, calls, _finished(usage), stopped_by))

        async def events() -> AsyncIterator[str]:
            stream = anthropic.MessageStream(model)
            splitter = CallSplitter(plan.call_format, plan.requires_call)
            kind, value = first
            try:
                for line in stream.start(_reply(job).generation.usage):
                    yield line
                while True:
                    if kind == "text":
                        for line in stream.text(splitter.feed(value.text)):
                            yield line
                    elif kind == "done":
                        _finished(value)
                        reply = _reply(job)
                        text, calls = reply.reply()
                        for line in stream.text(splitter.rest(text, calls)):
                            yield line
                        for line in stream.finish(calls, value, reply.stopped_by(params.stop)):
                            yield line
                        return
                    else:
                        err = _as_api_error(value)
                        kind_ = ANTHROPIC_KINDS.get(err.kind, err.kind)
                        yield anthropic.sse("error", anthropic.error_json(err.message, kind_))
                        return
                    kind, value = await job.events.get()
            finally:
                job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post(
        "/v1/messages/count_tokens",
        responses=_errors(400, *guarded, 413, 503, model=anthropic.AnthropicErrorResponse),
    )
    async def count_tokens(req: anthropic.CountTokensRequest) -> dict[str, Any]:
        """How many input tokens a Messages request would read."""
        service = ready()
        eng = service.engine
        full = req.as_messages_request()
        plan = await service.prepare(_anthropic_plan, eng, full.openai_tools(), full.tool_choice)
        chat = await service.prepare(full.chat_messages, service.resolve_image)
        ids = await service.prepare(service.chat_ids, chat, plan)
        return {"input_tokens": len(ids)}

    @app.post(
        "/v1/completions",
        response_model=None,
        responses={**SSE_RESPONSE, **_errors(400, *guarded, 413, 503)},
    )
    async def completions(
        req: protocol.CompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        service = ready()
        eng = service.engine
        if _agent_from(request, req.agent) is not None:
            raise ApiError(
                400,
                "agents hold conversations: use /v1/chat/completions with an agent "
                "(/v1/completions is stateless)",
                param="agent",
            )
        params = req.sampling(DEFAULT_MAX_TOKENS)
        top = req.logprobs_top()
        ids = await service.prepare(eng.tokenize, req.prompt_text())
        if req.prompt_cache_key is not None:
            job = service.submit_prompt_cache(req.prompt_cache_key, ids, params, top)
        else:
            job = service.submit_stateless(ids, params, top)
        rid = protocol.new_id("cmpl")
        model = service.model_id
        token_bytes = eng.tokenizer.token_bytes
        first = await _first_event(job, request)
        if not req.stream:
            text, logprobs, usage = await _collect(job, request, first)
            lp = protocol.completion_logprobs(logprobs, token_bytes) if top is not None else None
            reason = usage.finish_reason or "stop"
            return JSONResponse(protocol.completion(rid, model, text, reason, _finished(usage), lp))

        offset = [0]

        def on_delta(d: Delta) -> dict[str, Any]:
            lp = None
            if top is not None:
                lp = protocol.completion_logprobs(d.logprobs, token_bytes, offset[0])
                offset[0] += sum(len(t) for t in lp["tokens"])
            return protocol.completion(rid, model, d.text, None, logprobs=lp)

        def on_done(usage: Usage) -> list[dict[str, Any]]:
            _finished(usage)
            last = protocol.completion(rid, model, "", usage.finish_reason or "stop")
            if req.include_usage:
                last["usage"] = protocol.usage_json(usage)
            return [last]

        return StreamingResponse(
            _stream_events(job, first, on_delta, on_done), media_type="text/event-stream"
        )

    # -- tokens and templates ---------------------------------------------------------------
    @app.post("/tokenize", responses=_errors(400, *guarded, 413, 503))
    async def tokenize(req: protocol.TokenizeRequest) -> dict[str, Any]:
        """Token ids of ``content`` (with ``with_pieces``: each id with its text)."""
        service = ready()
        eng = service.engine
        ids = await service.prepare(eng.tokenize, req.content, req.add_special)
        if not req.with_pieces:
            return {"tokens": ids}
        return {"tokens": [{"id": t, "piece": _piece(eng.tokenizer.token_bytes(t))} for t in ids]}

    @app.post("/detokenize", responses=_errors(400, *guarded, 413, 503))
    async def detokenize(req: protocol.DetokenizeRequest) -> dict[str, Any]:
        """The text of ``tokens``."""
        service = ready()
        vocab = service.engine.backend.config.vocab_size
        for i, t in enumerate(req.tokens):
            if not 0 <= t < vocab:
                raise ApiError(
                    400, f"tokens.{i}: {t} is not a token id (0..{vocab - 1})", param=f"tokens.{i}"
                )
        return {"content": await service.prepare(service.engine.detokenize, req.tokens)}

    @app.post("/apply-template", responses=_errors(400, *guarded, 413, 503))
    async def apply_template(req: protocol.ApplyTemplateRequest) -> dict[str, Any]:
        """The prompt the chat template renders for ``messages`` (what a chat request with
        them reads)."""
        service = ready()
        prompt = await service.prepare(
            service.engine.render_chat, req.message_dicts(), req.add_generation_prompt
        )
        return {"prompt": prompt}

    # -- agents ------------------------------------------------------------------------
    def _info(eng: Engine, name: str) -> dict[str, Any]:
        for info in eng.agents():
            if info.name == name:
                return _agent_json(info)
        raise ApiError(404, f"agent {name!r} not found", "not_found_error", "agent_not_found")

    def _existing(eng: Engine, name: str) -> str:
        try:
            validate_agent_name(name)
        except InvalidAgentName as exc:
            raise ApiError(400, str(exc), code="invalid_agent_id") from None
        if not eng.has_agent(name):
            raise ApiError(404, f"agent {name!r} not found", "not_found_error", "agent_not_found")
        return name

    @app.get("/v1/agents", responses=_errors(*guarded, 503))
    def list_agents() -> dict[str, Any]:
        eng = ready().engine
        return {"object": "list", "data": [_agent_json(a) for a in eng.agents()]}

    @app.get("/v1/agents/{agent_id}", responses=_errors(400, *guarded, 404, 503))
    def get_agent(agent_id: str) -> dict[str, Any]:
        eng = ready().engine
        name = _existing(eng, agent_id)
        agent = eng.agent(name)
        return {**_info(eng, name), "system": agent.system, "conversation": agent.messages}

    @app.delete("/v1/agents/{agent_id}", responses=_errors(400, *guarded, 404, 503))
    def delete_agent(agent_id: str) -> dict[str, Any]:
        eng = ready().engine
        name = _existing(eng, agent_id)
        eng.delete_agent(name)
        return {"id": name, "object": "agent.deleted", "deleted": True}

    @app.post(
        "/v1/agents/{agent_id}/fork",
        status_code=201,
        responses=_errors(400, *guarded, 404, 409, 413, 503),
    )
    def fork_agent(agent_id: str, req: protocol.ForkRequest) -> dict[str, Any]:
        eng = ready().engine
        name = _existing(eng, agent_id)
        try:
            validate_agent_name(req.name)
        except InvalidAgentName as exc:
            raise ApiError(400, str(exc), code="invalid_agent_id") from None
        if eng.has_agent(req.name):
            raise ApiError(409, f"agent {req.name!r} already exists", code="agent_exists")
        eng.agent(name).fork(req.name)
        return _info(eng, req.name)

    return app


def _piece(raw: bytes) -> str | list[int]:
    """A token's text, or its bytes where they are not whole UTF-8 characters."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)
