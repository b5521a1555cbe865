"""The HTTP front end: a process of its own beside rank 0's engine (vLLM V1's API-server split).

Rank 0 calls `start_frontend` first thing: it binds `server.host`:`server.port` (a port in
use fails the job before any model loads) and spawns the front end, which reads the config,
loads the tokenizer and imports FastAPI while the model loads. `run` is the process: it
serves the OpenAI API (server/app.py) with uvicorn on that socket at once, talking to the
engine through its `EngineClient`. Until the engine's "ready" (requests/engine_link.py) the
probes say the model is loading (`/health` 200: alive; `/ready` 503: not ready) and the
routes that need the model answer 503; the "serving ..." line is printed when it arrives.
The HTTP side (parsing, tokenizing prompts, JSON, an SSE event per token and stream, the
socket writes) thus runs under its own interpreter lock, never the engine's.

It never decides to stop by itself: SIGTERM or SIGINT to it asks the engine to drain. It
exits once the engine sent "exit" (or its pipe closed) and every request still open got its
answer (at most `ANSWER_GRACE_S`), with status 0 after a drain and 1 when the engine failed.
When rank 0 dies the pipe closes, so the open requests get an error (an SSE error event
when streaming) before it exits; should it outlive rank 0 any longer, `exit_after_parent`
ends it.

Limits on what a client can make it hold: request bodies (`server.max_body_mb`,
server/middleware.py `BodyLimit`), and the time a connection may take to send a request's
headers (`server.header_timeout_s`, `HeaderDeadline`: uvicorn's own keep-alive timeout
starts only after a first answer, so a client sending headers slowly was held open forever).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

ANSWER_GRACE_S = 10.0  # after the engine's exit, how long callers get to receive their last answer
GC_THRESHOLDS = (50_000, 20, 10)  # from the process's start: its imports are not walked every 700 allocations


def model_name(cfg) -> str:
    return Path(cfg.model.checkpoint).resolve().name


def server_api_key(cfg, environ=os.environ) -> str | None:
    """The bearer token clients must send: server.api_key, else $LAMINA_API_KEY, else none."""
    return cfg.server.api_key or environ.get("LAMINA_API_KEY") or None


def raise_open_files_limit() -> None:
    """Every client connection is a file descriptor: lift the soft limit (often 1024) to the
    hard one, or a burst of clients is refused at the socket, before any HTTP error."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def quiet_garbage_collector() -> None:
    """Python's cycle collector, set for a server: the start-up heap (FastAPI, pydantic's
    schemas, the tokenizer) is frozen out of every collection, and the youngest generation is
    collected every 50,000 allocations instead of 700. Each request allocates thousands of
    short-lived containers, and 1,000 requests in flight hold their prompts' id lists, which
    every older collection walked, so a burst's CPU time per request grew with the requests
    in flight (docs/BENCHMARKS.md; vLLM's API server freezes too)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's address, bound (SO_REUSEADDR, as uvicorn binds) but not yet listening.
    Rank 0 binds it before the model loads and hands it to the front end, so a port in use
    fails the job at once, naming the keys; `lamina serve` binds it for a moment before it
    starts any rank. ConfigError when it cannot be bound."""
    from megatron_lamina.config import ConfigError

    sock = None
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        return sock
    except OSError as e:
        if sock is not None:
            sock.close()
        raise ConfigError(f"server.host:server.port = {host}:{port}: cannot listen there ({e.strerror or e}); "
                          "pick another with --set server.port=N (or server.host)") from None


class HeaderDeadline:
    """Mixed into uvicorn's HTTP protocol class: a connection that has not sent a whole
    request's headers `header_timeout_s` after it opened, or after its last answer, is closed.
    uvicorn makes the protocol's `cycle` when the headers are complete; a deadline finds the
    same cycle it was armed with only when no request began since."""

    header_timeout_s: float

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        self._arm_header_deadline()  # before uvicorn starts a pipelined request's cycle
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline, self.cycle)

    def _header_deadline(self, armed_with) -> None:
        if self.cycle is armed_with and not self.transport.is_closing():
            self.transport.close()


def http_protocol(header_timeout_s: float) -> type:
    """uvicorn's HTTP protocol class (httptools, else h11) with the header deadline."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type("LaminaHTTPProtocol", (HeaderDeadline, AutoHTTPProtocol), {"header_timeout_s": header_timeout_s})


def exit_after_parent(grace_s: float) -> None:
    """End this process `grace_s` after rank 0 (its parent) died. Not the kernel's parent-death
    signal, which would kill it at once: the closed pipe lets it answer open requests first."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="lamina-parent-watch", daemon=True).start()


def start_frontend(args) -> tuple[BaseProcess, Connection]:
    """Bind the port and spawn the front end for the job's parsed arguments; its process and
    rank 0's end of the pipe. ConfigError for a config that does not load or a port in use."""
    from megatron_lamina.config import config_from_args

    server = config_from_args(args).server
    sock = listen_socket(server.host, server.port)
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA and gloo state
    ours, theirs = ctx.Pipe(duplex=True)
    process = ctx.Process(target=run, args=(theirs, args, sock), name="lamina-frontend", daemon=True)
    process.start()  # the child gets its own copy of the socket
    theirs.close()
    sock.close()
    return process, ours


def run(conn: Connection, args, sock: socket.socket) -> None:
    gc.set_threshold(*GC_THRESHOLDS)  # before transformers, torch and FastAPI are imported
    exit_after_parent(ANSWER_GRACE_S + 5.0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until uvicorn's own handlers take over (below)
    import uvicorn

    from megatron_lamina.checkpoint.auto_convert import with_canonical_checkpoint
    from megatron_lamina.config import config_from_args
    from megatron_lamina.requests.tokenizer import TextCodec
    from megatron_lamina.server.app import build_app
    from megatron_lamina.server.engine_client import EngineClient
    from megatron_lamina.server.metrics import ServerMetrics

    given = config_from_args(args)
    name = model_name(given)  # the name the user gave, not that of a converted copy in the cache
    cfg = with_canonical_checkpoint(given, args.config)  # rank 0 converted it before spawning this process
    codec = TextCodec(cfg.model.checkpoint)
    raise_open_files_limit()
    api_key = server_api_key(cfg)
    address = f"http://{cfg.server.host}:{cfg.server.port}"

    engine_ready = []  # the engine's EngineInfo, once its "ready" came

    def on_ready(info) -> None:  # from now on /ready answers 200
        engine_ready.append(info)
        server.announce()

    metrics = ServerMetrics()
    client = EngineClient(conn, codec, cfg.server.max_queued_requests, metrics, cfg.server.stall_timeout_s,
                          on_ready=on_ready)
    app = build_app(client, name, metrics, api_key=api_key, cors_origins=cfg.server.cors_origins,
                    max_body_bytes=cfg.server.max_body_mb * 2**20, config=cfg.server)

    class Server(uvicorn.Server):
        answered_by: float | None = None

        def handle_exit(self, sig, frame):
            if sig in (signal.SIGTERM, signal.SIGINT):  # the engine decides: it drains, then says exit
                client.ask_drain()
            else:
                super().handle_exit(sig, frame)

        def announce(self) -> None:
            """The "serving ..." line, once uvicorn listens and the engine is ready, in either order."""
            if self.started and engine_ready:
                print(f"serving {name} on {address} (engine pid {engine_ready[0].engine_pid}, HTTP front "
                      f"end pid {os.getpid()}{'; API key required' if api_key else ''})", flush=True)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)  # listens on the socket rank 0 bound
            if self.started and not engine_ready:
                print(f"listening on {address} while the model loads (HTTP front end pid {os.getpid()}): "
                      "/health answers 200, /ready 503 until it serves", flush=True)
            self.announce()

        async def on_tick(self, counter: int) -> bool:
            if client.exited is not None and client.exited.is_set():
                self.answered_by = self.answered_by or time.monotonic() + ANSWER_GRACE_S
                if client.idle() or time.monotonic() >= self.answered_by:
                    self.should_exit = True
            return await super().on_tick(counter)

    server = Server(uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port, log_level="warning",
                                   timeout_graceful_shutdown=5, http=http_protocol(cfg.server.header_timeout_s)))
    quiet_garbage_collector()
    server.run(sockets=[sock])
    sys.exit(1 if client.state == "dead" else 0)
