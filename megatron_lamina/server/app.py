"""The OpenAI-compatible HTTP API (FastAPI), served by uvicorn on the driver rank.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (JSON or Server-Sent Events with
`stream: true`, ending with `data: [DONE]`), `GET /v1/models`, `GET /health` (503 once the
engine is draining or dead), `GET /metrics` (Prometheus text). Every error is an OpenAI error
body: 400 for bad input (naming the field), 404 for an unknown model, 503 when the engine
takes no request (queue full, draining, dead) or fails one mid-way. A client that
disconnects cancels its request (its blocks are freed at the next step).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from megatron_lamina.engine.async_engine import AsyncEngine, EngineUnavailable
from megatron_lamina.engine.output import RequestOutput
from megatron_lamina.server.metrics import ServerMetrics
from megatron_lamina.server.protocol import (
    ApiError, ChatCompletionRequest, CompletionRequest, validation_error,
)


def build_app(engine: AsyncEngine, model_name: str, max_model_len: int, metrics: ServerMetrics) -> FastAPI:
    app = FastAPI(title="megatron-lamina", version="0.1.0")

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        err = validation_error(exc.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/health")
    async def health():
        ok = engine.state == "serving"
        body = {"status": "ok" if ok else engine.state, "error": engine.error}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "megatron-lamina", "max_model_len": max_model_len}]}

    async def admit(body, http: HttpRequest, default_max_tokens: int | None, max_tokens: int | None):
        if body.model is not None and body.model != model_name:
            raise ApiError(404, f"model '{body.model}' does not exist; this server serves '{model_name}'",
                           "model", code="model_not_found")
        item = body.prompt_input()
        prompt_field = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        try:
            request = await run_in_threadpool(engine.make_request, item)
        except ValueError as e:
            raise ApiError(400, str(e), prompt_field) from e
        room = max_model_len - request.num_tokens
        wanted = max_tokens or default_max_tokens or room
        if wanted > room:
            raise ApiError(400, f"max_tokens = {wanted} is too large: the prompt has {request.num_tokens} "
                                f"tokens and the model's context is {max_model_len}", "max_tokens")
        request.params = body.sampling_params(wanted)
        request.generator = request.params.make_generator(request.generator.device)  # the engine's device
        try:
            return request, engine.generate(request)
        except EngineUnavailable as e:
            raise ApiError(503, str(e), None, type="server_error") from e

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        request, outputs = await admit(body, http, 16, body.max_tokens)
        return await respond(body, http, outputs, request_id=f"cmpl-{uuid.uuid4().hex}", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):
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
