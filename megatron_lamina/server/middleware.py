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
