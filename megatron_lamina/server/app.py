"""The OpenAI-compatible HTTP API (FastAPI), served by uvicorn in the front end process.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (JSON or Server-Sent Events with
`stream: true`, ending with `data: [DONE]`; several prompts and `n` samples each, with
log-probabilities: `server/choices.py`, `server/responses.py`), `GET /v1/models`,
`GET /v1/models/{id}`, `POST /tokenize`, `POST /detokenize`, `GET /version`, `GET /metrics`
(Prometheus text), the admin `POST /reset_prefix_cache`, and the probes: `GET /health` (liveness: 200 while the model loads and
while the engine serves; 503 once it is draining, stopped or dead, or stalled: requests
pending and no step for `server.stall_timeout_s`) and `GET /ready` (readiness: 200 only
while serving, so an orchestrator tells "loading" from "dead"). Around them
(`server/middleware.py`): the request id and access log, CORS, the API key. Every error is
an OpenAI error body: 400 for bad input (naming the field), 401 without the API key, 404
for an unknown model or route, 405 for a wrong method, 413 for a body larger than
`server.max_body_mb`, 415 for a body that is not JSON, 503
while the model loads (every route that needs it), when the engine takes no request (queue
full, draining, dead) or fails one mid-way, and a 500 (a bug of ours) too. A client that
disconnects cancels its requests (their blocks are freed at the next step). The app reaches
the engine only through its `EngineClient` (server/engine_client.py), which it attaches to
the event loop at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Depends, FastAPI, Request as HttpRequest
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from megatron_lamina.config import ServerConfig
from megatron_lamina.server.choices import admit, make_choices
from megatron_lamina.server.engine_client import EngineClient, EngineUnavailable
from megatron_lamina.server.grammar_check import GrammarCheck
from megatron_lamina.server.metrics import ServerMetrics
from megatron_lamina.server.middleware import ApiKeyCheck, BodyLimit, BodyTooLarge, RequestLog, access_logger
from megatron_lamina.server.protocol import (
    ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, read_body,
)
from megatron_lamina.server.responses import ChoiceWriter, respond_json, sse_events
from megatron_lamina.server.tool_parsers import parser_for

ROUTES = ("POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize, POST /detokenize, "
          "GET /version, GET /health, GET /ready, GET /metrics, POST /reset_prefix_cache")


def package_version() -> str:
    try:
        return version("megatron-lamina")
    except PackageNotFoundError:
        return "unknown"


def build_app(engine: EngineClient, model_name: str, metrics: ServerMetrics, api_key: str | None = None,
              cors_origins: Sequence[str] = (), access_log: logging.Logger | None = None,
              max_body_bytes: int = 32 * 2**20, config: ServerConfig | None = None) -> FastAPI:
    """`config`: the server section (structured outputs' limits, the tool-call parser)."""
    @asynccontextmanager
    async def lifespan(_):
        engine.attach(asyncio.get_running_loop())
        yield
        engine.detach()

    app = FastAPI(title="megatron-lamina", version=package_version(), lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyCheck, api_key=api_key)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id"])
    app.add_middleware(RequestLog, log=access_log or access_logger())  # outermost: sees every answer
    codec = engine.codec
    config = config or ServerConfig()
    grammars = GrammarCheck(codec, config)
    tool_parser = parser_for(config.tool_call_parser, codec.tokenizer.chat_template)

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_, exc: BodyTooLarge):
        return JSONResponse(exc.body(), status_code=413)

    @app.exception_handler(HTTPException)
    async def _http_error(http: HttpRequest, exc: HTTPException):
        if exc.status_code == 404:
            err = ApiError(404, f"no route {http.method} {http.url.path}; routes: {ROUTES}", code="not_found")
        elif exc.status_code == 405:
            allowed = exc.headers.get("Allow", "") if exc.headers else ""
            err = ApiError(405, f"method {http.method} is not allowed on {http.url.path}; use {allowed}",
                           code="method_not_allowed")
        else:
            err = ApiError(exc.status_code, str(exc.detail))
        return JSONResponse(err.body(), status_code=err.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(_, exc: Exception):
        err = ApiError(500, f"internal error ({type(exc).__name__}); see the server log", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def probe(readiness: bool) -> JSONResponse:
        """Liveness fails only for an engine that cannot serve again (draining, stopped, dead)
        or is stalled; readiness also while the model loads."""
        engine.check_progress(time.monotonic())
        status, error = engine.state, engine.error
        if status == "serving" and engine.stall is not None:
            status, error = "stalled", engine.stall
        ok = status == "serving" or (status == "loading" and not readiness)
        body = {"status": "ok" if status == "serving" else status, "error": error}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/health")
    async def health():
        return probe(readiness=False)

    @app.get("/ready")
    async def ready():
        return probe(readiness=True)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/version")
    async def server_version():
        return {"version": package_version()}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """Admin: forget every cached prefix (behind the API key, when one is set); running
        requests keep their blocks."""
        try:
            blocks = await engine.reset_prefix_cache()
        except EngineUnavailable as e:
            raise ApiError(503, str(e), None, type="server_error") from e
        return {"status": "ok", "blocks_forgotten": blocks}

    async def model_loaded() -> None:
        if engine.capacity is None:  # no "ready" from the engine yet: nothing to check a request against
            message = ("the model is loading; retry once GET /ready answers 200" if engine.state == "loading"
                       else f"the server is {engine.state}: {engine.error}")
            raise ApiError(503, message, type="server_error", code="model_not_ready")

    api = APIRouter(dependencies=[Depends(model_loaded)])  # the routes that need the model

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "megatron-lamina",
                "max_model_len": engine.max_model_len}

    def unknown_model(name: str) -> ApiError:
        return ApiError(404, f"model '{name}' does not exist; this server serves '{model_name}'",
                        "model", code="model_not_found")

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise unknown_model(model_id)
        return model_card()

    def check_model(body) -> None:
        if body.model is not None and body.model != model_name:
            raise unknown_model(body.model)

    @api.post("/tokenize")
    async def tokenize(http: HttpRequest):
        body = read_body(http.headers.get("content-type"), await http.body(), TokenizeRequest)
        check_model(body)
        if body.messages is not None:
            messages = [m.plain() for m in body.messages]
            try:
                tokens = await run_in_threadpool(codec.encode_chat, messages, body.add_generation_prompt)
            except ValueError as e:  # the chat template refused the messages
                raise ApiError(400, str(e), "messages") from None
        else:
            tokens = await run_in_threadpool(codec.encode_prompt, body.prompt, body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}

    @api.post("/detokenize")
    async def detokenize(http: HttpRequest):
        body = read_body(http.headers.get("content-type"), await http.body(), DetokenizeRequest)
        check_model(body)
        vocab = engine.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise ApiError(400, f"tokens: token ids must be in [0, {vocab})", "tokens")
        return {"prompt": await run_in_threadpool(codec.tokenizer.decode, body.tokens)}

    @api.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = read_body(http.headers.get("content-type"), await http.body(), CompletionRequest)
        return await generate(body, http, "cmpl", "text_completion", "text_completion")

    @api.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        body = read_body(http.headers.get("content-type"), await http.body(), ChatCompletionRequest)
        return await generate(body, http, "chatcmpl", "chat.completion", "chat.completion.chunk")

    async def generate(body, http: HttpRequest, prefix: str, obj: str, chunk_obj: str):
        check_model(body)
        request_id = f"{prefix}-{http.state.request_id}"
        choices = await make_choices(engine, body, request_id, engine.capacity.max_model_len, grammars)
        outputs = admit(engine, choices)
        writer = ChoiceWriter(body, choices, codec, tool_parser)
        header = {"id": request_id, "object": chunk_obj if body.stream else obj, "created": int(time.time()),
                  "model": model_name}

        def record(usage: dict[str, int]) -> None:  # for the access log
            http.state.usage = (usage["prompt_tokens"], usage["completion_tokens"])

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = sse_events(writer, outputs, header, include_usage, record)
            return StreamingResponse(events, media_type="text/event-stream")
        answer = await respond_json(writer, outputs, http.is_disconnected, header)
        if answer is None:
            return Response(status_code=499)
        record(answer["usage"])
        return answer

    app.include_router(api)
    return app
