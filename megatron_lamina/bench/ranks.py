"""Ranks for the benchmark and profiling tools: a one-rank world, a torchrun TP world, and
processes spawned as the other ranks of a measurement.

  * `init_one_rank`: this process alone as a torch.distributed world (Megatron's layers want
    a process group even at TP 1): gloo on the CPU, NCCL on GPU 0;
  * `init_torchrun_tp`: under torchrun, one NCCL rank per GPU, all of them one TP group;
  * `Ranks`: `fn(rank, world, init_method, *args)` on `world` ranks, rank 0 in this process
    and the others spawned (the profiler: rank 0 measures, the others follow);
  * `spawn_ranks`: `target(rank, port, *args, results)` on `world` spawned processes, one GPU
    each, this process watching them (a rank that dies or hangs ends the run with its
    traceback, never a wait without end); returns what rank 0 put on `results`.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_one_rank(backend: str, port: int | None = None) -> None:
    """This process as a one-rank world: `backend` gloo (CPU) or nccl (GPU 0, made current)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port or free_port()))
    if backend == "nccl":
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    else:
        dist.init_process_group(backend, rank=0, world_size=1)


def init_torchrun_tp() -> int:
    """Under torchrun: one NCCL rank per GPU, all of them one TP group; returns the TP size."""
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    return dist.get_world_size()


class Ranks:
    """fn(rank, world, init_method, *args) on `world` ranks: ranks 1.. are spawned when this
    is built, rank 0 is this process, in `run()`, which returns rank 0's value."""

    def __init__(self, fn: Callable, world: int, *args):
        import multiprocessing as mp

        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.fn, self.world, self.args, self.errors = fn, world, args, ctx.Queue()
        self.procs = [ctx.Process(target=_spawned_rank, args=(fn, rank, world, self.init_method, self.errors, args))
                      for rank in range(1, world)]
        for p in self.procs:
            p.start()

    def run(self):
        try:
            value = self.fn(0, self.world, self.init_method, *self.args)
        except BaseException:
            self.kill()
            raise
        for p in self.procs:
            p.join(timeout=60)
        if not self.errors.empty():
            raise RuntimeError(self.errors.get())
        return value

    def kill(self):
        for p in self.procs:
            if p.is_alive():
                p.kill()


def _spawned_rank(fn, rank, world, init_method, errors, args):
    import traceback

    try:
        fn(rank, world, init_method, *args)
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def _watched_rank(target, rank, port, args, results, hang_s):
    """Run one rank; a failure or a hang is reported (with every thread's stack) instead of
    leaving the other ranks waiting forever."""
    import faulthandler
    import traceback

    faulthandler.dump_traceback_later(hang_s, exit=True)  # a hang prints where, then exits
    try:
        target(rank, port, *args, results)
    except BaseException:
        message = f"rank {rank} failed:\n{traceback.format_exc()}"
        print(message, file=sys.stderr, flush=True)
        results.put(message)
        results.close()
        results.join_thread()  # the message is in the pipe before the process ends
        os._exit(1)


def spawn_ranks(target: Callable, args: tuple, world: int, timeout_s: float) -> Any:
    """`world` spawned ranks (rank r on GPU r, as `target` sets it up); returns what rank 0
    puts on the results queue. A rank that dies, fails or outlives `timeout_s` ends the run
    with a RuntimeError (its traceback or every thread's stack is printed above)."""
    import multiprocessing as mp
    import queue

    port = free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_watched_rank, args=(target, r, port, args, results, timeout_s))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s + 30
    value = None
    try:
        while value is None:
            try:
                value = results.get(timeout=5)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    what = ", ".join(f"rank {procs.index(p)} exit {p.exitcode}" for p in dead) or "timeout"
                    raise RuntimeError(f"the {world}-rank run failed ({what}); the ranks' stacks are above") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if isinstance(value, str):
        raise RuntimeError(value)
    return value
