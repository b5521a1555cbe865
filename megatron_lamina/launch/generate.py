"""Offline batch generation, JSONL in, JSONL out: the program of every rank of a batch job.

    lamina generate --config CFG --input IN.jsonl --output OUT.jsonl [--resume | --overwrite] [--quiet]
    lamina generate MODEL --input IN.jsonl --output OUT.jsonl   (MODEL: a checkpoint, HF directory or GGUF file)
    lamina generate --config CFG --nnodes N --node-rank R --rdzv-endpoint HOST:PORT ...   (each machine)
    torchrun --nproc-per-node N launcher/generate.py --config CFG --input IN.jsonl --output OUT.jsonl

`lamina generate` checks the config, the input and the output first and starts the N =
parallel.tensor_parallel + parallel.attention_workers ranks itself; launcher/generate.py is
this module for torchrun. Every rank dies with its launcher (`ranks.exit_with_parent`).
Rank 0 locks the output (`batch/batch_output.py`: a second job on the same file is refused),
reads the input (`batch/batch_job.py`), and runs every line through the continuous-batching
engine (`batch/batch_run.py`): exactly one record per input line, appended and flushed as
its request finishes, error records for lines that cannot run. The job ends with a summary
line; it exits 0 when every line has a result, 1 when some line failed, 2 on a usage or
config mistake. `--resume` keeps what an interrupted run wrote and runs only the missing ids,
so a killed job restarted with it loses and duplicates nothing. Ctrl-C or SIGTERM stops the
job at the next step (exit status 128 + the signal); --resume finishes it. The other ranks
execute the step plans rank 0 broadcasts.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from megatron_lamina.config import add_config_arguments
from megatron_lamina.launch.nodes import add_node_arguments
from megatron_lamina.launch.ranks import end_rank, exit_with_parent, require_launcher
from megatron_lamina.worker.collector import collect_rarely


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_node_arguments(parser)
    parser.add_argument("--input", required=True, help="JSONL file, one request per line")
    parser.add_argument("--output", required=True,
                        help="JSONL file for the results (its directory is created; locked while the job runs)")
    parser.add_argument("--quiet", action="store_true", help="do not print the answers")
    parser.add_argument("--resume", action="store_true",
                        help="keep the records already in --output and run only the ids missing there")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --output that already holds something (without it, or --resume, the job "
                             "refuses to)")
    parser.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                        help="when stderr is not a terminal, print a progress line this often (default 10)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not require_launcher("generate", args):
        return 2
    exit_with_parent()
    collect_rarely()  # before torch and Megatron-core are imported (worker/collector.py)
    # Ctrl-C or SIGTERM (the launcher passes either to every rank): the driver stops at the
    # next step and releases the others, which wait for it (a rank leaving in the middle of
    # a collective would leave the rest stuck in theirs).
    stop = Stop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop.handler)
    import torch.distributed as dist

    from megatron_lamina.batch.batch_job import read_batch
    from megatron_lamina.batch.batch_output import BatchOutput, OutputError
    from megatron_lamina.worker.runtime import is_driver, job_from_args, join, serve_worker, start_from_placement

    job = job_from_args(args)
    if job is None:
        return 2
    cfg, node_rank = job
    driver = is_driver(node_rank)  # on node 0: only its machine needs the input and the output
    if not driver:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    if driver:  # before the model loads: a busy output or a bad input fails in a second
        if not Path(args.input).is_file():
            print(f"error: --input {args.input}: no such file", file=sys.stderr)
            return 2
        try:
            output = BatchOutput.open(args.output, args.resume, args.overwrite, input_path=args.input)
            lines = read_batch(args.input, max_line_bytes=cfg.server.max_body_mb * 2**20)
        except (OutputError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    placement = join(cfg, node_rank)
    if placement is None:
        return 2
    ctx = start_from_placement(cfg, placement)
    if ctx is None:
        return 2
    code = 0
    if ctx.rank == 0:
        from megatron_lamina.batch.batch_run import run_batch
        from megatron_lamina.driver.llm_engine import LLMEngine
        from megatron_lamina.worker.runtime import quiet_gc

        engine = LLMEngine(ctx)
        quiet_gc()  # with the block manager built: start-up is over
        try:
            summary = run_batch(engine, args.input, lines, output, show=not args.quiet,
                                progress_interval_s=args.progress_interval, stop=stop.event)
        finally:
            engine.shutdown()
            output.close()
        print(summary.throughput(), file=sys.stderr, flush=True)
        print(summary.line(args.output), file=sys.stderr, flush=True)
        code = 128 + stop.signal if stop.signal else summary.exit_code
    else:
        if serve_worker(ctx):
            end_rank(1)
    dist.destroy_process_group()
    end_rank(code)


class Stop:
    """The signal that asked the job to stop, and an event the batch loop checks each step."""

    def __init__(self):
        self.event, self.signal = threading.Event(), 0

    def handler(self, sig, frame) -> None:
        self.signal = self.signal or sig
        self.event.set()


if __name__ == "__main__":
    sys.exit(main())
