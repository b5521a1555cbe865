"""What wraps every HTTP request: its id and access-log line, CORS, the API key.

Plain ASGI middlewares (no `BaseHTTPMiddleware`: streamed answers and disconnects pass
through untouched), in this order from the outside in:

* `RequestLog`: takes the client's `X-Request-Id` (printable ASCII, at most 128 characters)
  or makes one, puts it in the request's state (`request.state.request_id`: completion ids
  end with it) and in the response's `X-Request-Id` header, and writes one access-log line
  per request when its answer ends: client, method, path, status, prompt and completion
  tokens (what a route put in `request.state.usage`), latency, request id.
* Starlette's `CORSMiddleware`, with `server.cors_origins` (only when some are set): it
  answers preflights itself, so they need no key.
* `ApiKeyCheck`: with a key set, every route but the probes (`/health`, `/ready`) and
  `/metrics` needs the header `Authorization: Bearer KEY`; anything else is a 401 with an
  OpenAI error body.
* `BodyLimit`: a body larger than `server.max_body_mb` is a 413 with an OpenAI error body:
  at once when its content-length says so, and, for a chunked body, as soon as the bytes
  read pass the limit (nothing more is read; the connection is closed after the answer).
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
import time
import uuid

OPEN_PATHS = ("/health", "/ready", "/metrics")


def access_logger() -> logging.Logger:
    """The access log: one line per request on stderr."""
    log = logging.getLogger("megatron_lamina.access")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id" and 0 < len(value) <= 128 and all(33 <= b < 127 for b in value):
            return value.decode("ascii")
    return uuid.uuid4().hex


class RequestLog:
    def __init__(self, app, log: logging.Logger):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        request_id = _request_id(scope.get("headers", []))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = [None]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode("ascii"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            prompt, completion = state.get("usage", (0, 0))
            client = scope.get("client") or ("-", 0)
            self.log.info(f'access {client[0]}:{client[1]} "{scope["method"]} {scope["path"]}" '
                          f"{status[0] or 'no-response'} prompt_tokens={prompt} completion_tokens={completion} "
                          f"{time.monotonic() - started:.3f}s request_id={request_id}")


class ApiKeyCheck:
    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {
            "message": "invalid or missing API key: send the header 'Authorization: Bearer KEY' with the "
                       "server's key (server.api_key or $LAMINA_API_KEY)",
            "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    """Raised from `receive` once a body passed the limit; the app answers it with a 413."""

    def __init__(self, limit_bytes: int):
        super().__init__(f"the request body is larger than {limit_bytes // 2**20} MiB (server.max_body_mb)")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": None,
                          "code": "request_too_large"}}


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), b"")
        if length.isdigit() and int(length) > self.max_bytes:
            payload = json.dumps(BodyTooLarge(self.max_bytes).body()).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode()), (b"connection", b"close")]})
            return await send({"type": "http.response.body", "body": payload})
        read, over = 0, False

        async def counted_receive():
            nonlocal read, over
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    over = True
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def send_closing(message):  # a body left unread: close the connection after the answer
            if over and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counted_receive, send_closing)
