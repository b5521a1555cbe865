"""The OpenAI-compatible HTTP API (FastAPI), served by uvicorn on the driver rank.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (JSON or Server-Sent Events with
`stream: true`, ending with `data: [DONE]`), `GET /v1/models`, `GET /v1/models/{id}`,
`GET /health` (503 once the engine is draining or dead), `GET /metrics` (Prometheus text).
Every error is an OpenAI error body: 400 for bad input (naming the field), 404 for an
unknown model or route, 405 for a wrong method, 415 for a body that is not JSON, 503 when
the engine takes no request (queue full, draining, dead) or fails one mid-way, and a 500 (a
bug of ours) too. A client that disconnects cancels its request (its blocks are freed at the
next step).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from megatron_lamina.engine.async_engine import AsyncEngine, EngineUnavailable
from megatron_lamina.engine.output import RequestOutput
from megatron_lamina.engine.request_schema import RequestError, check_max_tokens
from megatron_lamina.server.metrics import ServerMetrics
from megatron_lamina.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, read_body


def build_app(engine: AsyncEngine, model_name: str, max_model_len: int, metrics: ServerMetrics) -> FastAPI:
    app = FastAPI(title="megatron-lamina", version="0.1.0")

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(http: HttpRequest, exc: HTTPException):
        if exc.status_code == 404:
            err = ApiError(404, f"no route {http.method} {http.url.path}; routes: POST /v1/completions, "
                                "POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics",
                           code="not_found")
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

    @app.get("/health")
    async def health():
        ok = engine.state == "serving"
        body = {"status": "ok" if ok else engine.state, "error": engine.error}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    model_card = {"id": model_name, "object": "model", "created": 0, "owned_by": "megatron-lamina",
                  "max_model_len": max_model_len}

    def unknown_model(name: str) -> ApiError:
        return ApiError(404, f"model '{name}' does not exist; this server serves '{model_name}'",
                        "model", code="model_not_found")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise unknown_model(model_id)
        return model_card

    async def admit(body, http: HttpRequest, default_max_tokens: int | None, max_tokens: int | None):
        if body.model is not None and body.model != model_name:
            raise unknown_model(body.model)
        item = body.prompt_input()
        prompt_field = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        try:
            request = await run_in_threadpool(engine.make_request, item)
        except ValueError as e:
            raise ApiError(400, str(e), prompt_field) from e
        wanted = max_tokens or default_max_tokens or max_model_len - request.num_tokens
        try:
            check_max_tokens(wanted, request.num_tokens, max_model_len)
        except RequestError as e:
            raise ApiError.invalid(e) from None
        request.params = body.sampling_params(wanted)
        request.generator = request.params.make_generator(request.generator.device)  # the engine's device
        try:
            return request, engine.generate(request)
        except EngineUnavailable as e:
            raise ApiError(503, str(e), None, type="server_error") from e

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = read_body(http.headers.get("content-type"), await http.body(), CompletionRequest)
        request, outputs = await admit(body, http, 16, body.max_tokens)
        return await respond(body, http, outputs, request_id=f"cmpl-{uuid.uuid4().hex}", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        body = read_body(http.headers.get("content-type"), await http.body(), ChatCompletionRequest)
        request, outputs = await admit(body, http, None, body.max_completion_tokens or body.max_tokens)
        return await respond(body, http, outputs, request_id=f"chatcmpl-{uuid.uuid4().hex}", chat=True)

    async def respond(body, http: HttpRequest, outputs: AsyncIterator[RequestOutput], request_id: str, chat: bool):
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse(outputs, request_id, created, model_name, chat, include_usage, body.return_token_ids)
            return StreamingResponse(events, media_type="text/event-stream")
        collected = asyncio.create_task(_collect(outputs))
        while not collected.done():  # a non-streaming client that leaves cancels its request
            await asyncio.wait({collected}, timeout=0.5)
            if not collected.done() and await http.is_disconnected():
                collected.cancel()
                return Response(status_code=499)
        text, token_ids, last = collected.result()
        if last.error is not None:
            raise ApiError(503, last.error, None, type="server_error")
        choice = {"index": 0, "logprobs": None, "finish_reason": last.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if body.return_token_ids:
            choice["token_ids"] = token_ids
        return {"id": request_id, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": model_name, "choices": [choice], "usage": _usage(last)}

    return app


async def _collect(outputs: AsyncIterator[RequestOutput]):
    text, token_ids, last = [], [], None
    async for out in outputs:
        text.append(out.text)
        token_ids.extend(out.token_ids)
        last = out
    return "".join(text), token_ids, last


def _usage(out: RequestOutput) -> dict[str, int]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


async def _sse(outputs, request_id, created, model, chat, include_usage, return_token_ids):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choices, **extra) -> str:
        payload = {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    if chat:
        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    last = None
    async for out in outputs:
        last = out
        if out.error is not None:
            yield f"data: {json.dumps(ApiError(503, out.error, None, type='server_error').body())}\n\n"
            break
        choice = {"index": 0, "logprobs": None, "finish_reason": out.finish_reason if out.finished else None}
        if chat:
            choice["delta"] = {"content": out.text} if out.text else {}
        else:
            choice["text"] = out.text
        if return_token_ids:
            choice["token_ids"] = out.token_ids
        yield event([choice])
    if include_usage and last is not None and last.error is None:
        yield event([], usage=_usage(last))
    yield "data: [DONE]\n\n"
