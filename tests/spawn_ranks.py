"""Run a function on N real ranks (separate processes, gloo over loopback) for tests.

`run_ranks(fn, world_size, *args)` spawns `world_size` processes with the environment
torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), calls
`fn(*args)` in each, and returns rank 0's return value. A rank that raises or exits non-zero
fails the call with its traceback; a job that outlives `timeout` is killed (never a hang).
Results travel through files (one pickle per rank), not a multiprocessing queue: a queue
handed to spawned children goes through a socket in the parent's /tmp/pymp-* folder, which
is one more thing that can vanish under a busy machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import time
import traceback
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, args, rank, world_size, port, results_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    outcome = ("error", "no result")
    try:
        import torch

        torch.set_num_threads(1)
        value = fn(*args)
        outcome = ("ok", value if rank == 0 else None)
    except BaseException:
        outcome = ("error", traceback.format_exc())
        raise
    finally:
        path = Path(results_dir) / f"rank{rank}.pkl"
        path.with_suffix(".tmp").write_bytes(pickle.dumps(outcome))
        path.with_suffix(".tmp").rename(path)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0):
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ranks-") as results_dir:
        procs = [ctx.Process(target=_entry, args=(fn, args, r, world_size, port, results_dir))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        results: dict[int, tuple] = {}
        try:
            while len(results) < world_size and time.monotonic() < deadline:
                for rank in range(world_size):
                    path = Path(results_dir) / f"rank{rank}.pkl"
                    if rank not in results and path.exists():
                        results[rank] = pickle.loads(path.read_bytes())
                if any(status == "error" for status, _ in results.values()):
                    time.sleep(2)  # let the other ranks report their view of the failure
                    for rank in range(world_size):
                        path = Path(results_dir) / f"rank{rank}.pkl"
                        if rank not in results and path.exists():
                            results[rank] = pickle.loads(path.read_bytes())
                    break
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    results.update({r: ("error", f"exited with code {procs[r].exitcode}") for r in dead})
                time.sleep(0.05)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()
    errors = [f"rank {r}:\n{value}" for r, (status, value) in sorted(results.items()) if status == "error"]
    if len(results) < world_size and not errors:
        errors.append(f"timed out after {timeout}s; ranks that reported: {sorted(results)}")
    if errors:
        raise RuntimeError("\n".join(errors))
    return results[0][1]
