"""Run a function on N real ranks (separate processes, gloo over loopback) for tests.

`run_ranks(fn, world_size, *args)` spawns `world_size` processes with the environment
torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), calls
`fn(*args)` in each, and returns rank 0's return value. A rank that raises or exits non-zero
fails the call with its traceback; a job that outlives `timeout` is killed (never a hang).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, args, rank, world_size, port, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        import torch

        torch.set_num_threads(1)
        value = fn(*args)
        results.put((rank, "ok", value if rank == 0 else None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, args, r, world_size, port, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcome, errors = None, []
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                break
            if rank == 0:
                outcome = value
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 2)
            if p.is_alive():
                p.kill()
    while errors and not results.empty():  # the other ranks' view of the failure
        rank, status, value = results.get()
        if status == "error":
            errors.append(f"rank {rank}:\n{value}")
    if errors:
        raise RuntimeError("\n".join(errors))
    return outcome
