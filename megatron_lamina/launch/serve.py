"""OpenAI-compatible serving: the program of every rank of a serving job.

    lamina serve --config CFG [--set key=value ...]
    torchrun --nproc-per-node N launcher/serve.py --config CFG [--set key=value ...]

`lamina serve` checks the config and starts the N = parallel.tensor_parallel +
parallel.attention_workers ranks itself; launcher/serve.py is this module for torchrun.
Every rank dies with its launcher (`ranks.exit_with_parent`). Rank 0 runs the HTTP server
(uvicorn, `server.host`:`server.port`; with `server.api_key` or $LAMINA_API_KEY every route
but /health and /metrics needs it; an access-log line per request on stderr) and the engine
thread; the other ranks execute the step plans it broadcasts. Shutdown and faults:
  * SIGTERM (or SIGINT, Ctrl-C) to rank 0 drains: new requests get 503, running ones finish
    (at most `server.drain_timeout_s`, then they are failed), the other ranks are released
    and the job exits 0. (Either signal to lamina or torchrun reaches every rank: the others
    ignore it and wait for the driver, which drains as above; the launcher then reports the
    signal.)
  * a rank that dies or stops answering makes the current step fail (gloo reports the closed
    connection at once, a hang after `runtime.step_timeout_s`): every in-flight request gets
    an error, /health turns 503 and the job exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from megatron_lamina.config import add_config_arguments
from megatron_lamina.launch.ranks import exit_with_parent, require_launcher


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


def serve_driver(ctx) -> int:
    import uvicorn

    from megatron_lamina.engine.async_engine import AsyncEngine
    from megatron_lamina.engine.llm_engine import LLMEngine
    from megatron_lamina.server.app import build_app
    from megatron_lamina.server.metrics import ServerMetrics

    cfg = ctx.cfg
    raise_open_files_limit()
    metrics = ServerMetrics()
    engine = AsyncEngine(LLMEngine(ctx), cfg.server.max_queued_requests,
                         heartbeat_s=cfg.runtime.step_timeout_s / 4, listener=metrics)
    api_key = server_api_key(cfg)
    app = build_app(engine, model_name(cfg), ctx.arch.max_position_embeddings, metrics, api_key=api_key,
                    cors_origins=cfg.server.cors_origins)
    drain = threading.Event()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if sig in (signal.SIGTERM, signal.SIGINT):  # drain instead of uvicorn's immediate exit
                engine.begin_drain()
                drain.set()
            else:
                super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port, log_level="warning",
                                   timeout_graceful_shutdown=5))

    def watch() -> None:
        """Ends the server when a drain is over or the engine died. At the drain's deadline the
        requests still running are failed first, and the HTTP server stops only once their
        callers have their error (a stream: an error event, then [DONE]; plain: an error body)."""
        deadline = None
        while not engine.stopped.wait(0.2):
            if drain.is_set():
                deadline = deadline or time.monotonic() + cfg.server.drain_timeout_s
                if engine.idle():
                    break
                if time.monotonic() >= deadline:
                    engine.fail_running(f"the server is shutting down: requests still running after "
                                        f"server.drain_timeout_s = {cfg.server.drain_timeout_s:g} s were stopped")
                    answered = time.monotonic() + 10
                    while not engine.idle() and time.monotonic() < answered:
                        time.sleep(0.05)
                    break
        server.should_exit = True

    engine.start()
    threading.Thread(target=watch, name="lamina-watch", daemon=True).start()
    print(f"serving {model_name(cfg)} on http://{cfg.server.host}:{cfg.server.port} "
          f"(driver pid {os.getpid()}{'; API key required' if api_key else ''})", flush=True)
    server.run()
    engine.stop()
    if engine.state == "dead":
        print(f"error: the engine failed: {engine.error}", file=sys.stderr, flush=True)
        return 1
    return 0


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not require_launcher("serve", args):
        return 2
    exit_with_parent()
    import torch.distributed as dist

    is_driver = os.environ["RANK"] == "0"
    if not is_driver:
        for sig in (signal.SIGTERM, signal.SIGINT):  # the driver decides when the job ends
            signal.signal(sig, signal.SIG_IGN)
    from megatron_lamina.engine.control_plane import serve_plans
    from megatron_lamina.engine.runtime import start_from_args

    ctx = start_from_args(args)
    if ctx is None:
        return 2
    if ctx.rank != 0:
        serve_plans(ctx)
        dist.destroy_process_group()
        return 0
    code = serve_driver(ctx)
    if code == 0:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # never wait on a collective with a dead peer


if __name__ == "__main__":
    sys.exit(main())
