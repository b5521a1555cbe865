"""OpenAI-compatible serving: the program of every rank of a serving job.

    lamina serve --config CFG [--set key=value ...] [--port N --host H --api-key KEY ...]
    lamina serve MODEL [--port N ...]   (MODEL: a checkpoint, a Hugging Face directory or a GGUF file)
    lamina serve --config CFG --nnodes N --node-rank R --rdzv-endpoint HOST:PORT   (each machine)
    torchrun --nproc-per-node N launcher/serve.py --config CFG [--set key=value ...]

`lamina serve` checks the config and starts the N = parallel.tensor_parallel +
parallel.attention_workers ranks itself; launcher/serve.py is this module for torchrun.
Every rank dies with its launcher (`ranks.exit_with_parent`). Rank 0 first spawns the HTTP
front end (server/frontend.py: uvicorn at `server.host`:`server.port`, in a process of its
own; with `server.api_key` or $LAMINA_API_KEY every route but /health and /metrics needs it;
an access-log line per request on stderr), then runs the engine loop
(driver/engine_service.py) in its main thread; the other ranks execute the step plans it
broadcasts. Shutdown and faults:
  * SIGTERM (or SIGINT, Ctrl-C) to rank 0 or to the front end drains: new requests get 503,
    running ones finish (at most `server.drain_timeout_s`, then they are failed), the other
    ranks are released and the job exits 0. (Either signal to lamina or torchrun reaches
    every rank: the others ignore it and wait for the driver, which drains as above; the
    launcher then reports the signal.)
  * a rank that dies or stops answering makes the current step fail (gloo reports the closed
    connection at once, a hang after `runtime.step_timeout_s`; idle, the driver's heartbeat
    finds either, worker/control_plane.py): every in-flight request gets
    an error, /health turns 503 and the job exits non-zero. A front end that dies ends the
    job the same way.
"""

from __future__ import annotations

import argparse
import signal
import sys

from megatron_lamina.config import add_config_arguments
from megatron_lamina.launch.nodes import add_node_arguments
from megatron_lamina.launch.ranks import end_rank, exit_with_parent, require_launcher
from megatron_lamina.worker.collector import collect_rarely

FRONT_END_EXIT_S = 30.0  # the front end answers what is left (10 s at most) and stops uvicorn (5 s)


def serve_driver(ctx, frontend, conn) -> int:
    """Rank 0: the engine loop, fed by the front end; the job's exit status."""
    from megatron_lamina.driver.engine_service import EngineService
    from megatron_lamina.driver.llm_engine import LLMEngine
    from megatron_lamina.worker.runtime import quiet_gc

    cfg = ctx.cfg
    service = EngineService(LLMEngine(ctx), conn, drain_timeout_s=cfg.server.drain_timeout_s)
    quiet_gc()  # with the block manager built: start-up is over
    for sig in (signal.SIGTERM, signal.SIGINT):  # drain, do not die
        signal.signal(sig, lambda *_: service.begin_drain())
    code = service.run()
    frontend.join(timeout=FRONT_END_EXIT_S)
    if service.state == "dead":
        print(f"error: the engine failed: {service.error}", file=sys.stderr, flush=True)
    elif service.error:
        print(f"error: {service.error}", file=sys.stderr, flush=True)
    return code


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_node_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not require_launcher("serve", args):
        return 2
    exit_with_parent()
    collect_rarely()  # before torch and Megatron-core are imported (worker/collector.py)
    import torch.distributed as dist

    from megatron_lamina.worker.runtime import is_driver, job_from_args, join, serve_worker, start_from_placement

    job = job_from_args(args)
    if job is None:
        return 2
    cfg, node_rank = job
    if is_driver(node_rank):  # the front end binds the port and starts while the machines join and load
        from megatron_lamina.config import ConfigError
        from megatron_lamina.server.frontend import start_frontend

        try:
            frontend, conn = start_frontend(args)
        except ConfigError as e:  # the config, or the port in use: before any model loads
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
    placement = join(cfg, node_rank)
    if placement is None:
        return 2
    ctx = start_from_placement(cfg, placement)
    if ctx is None:
        return 2
    if ctx.rank != 0:
        # Serving, the driver decides when the job ends (a drain). Until then a launcher's
        # SIGTERM ends the rank at once, as when rank 0 refused its config or port.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if serve_worker(ctx):
            end_rank(1)
        dist.destroy_process_group()
        end_rank(0)
    code = serve_driver(ctx, frontend, conn)
    if code == 0:
        dist.destroy_process_group()
    end_rank(code)


if __name__ == "__main__":
    sys.exit(main())
