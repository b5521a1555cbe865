"""Run a function on N real ranks (separate processes, gloo over loopback) for tests, on the
benchmarks' spawner (megatron_lamina/bench/ranks.py). `run_ranks` sends the job to one warm
`RankPool` of the test session (rank r of every job is the same process, spawned at the
first job that needs it and kept for the next), since spawning a rank, which imports torch,
Megatron and transformers, is most of a short job's cost; `spawned_ranks` spawns fresh ranks
(`run_ranks` of bench/ranks.py) for a job that needs them (`here`, `hang_s`)."""

import atexit
import multiprocessing.util  # noqa: F401  (its exit handler, which waits for live children, is registered first)

from megatron_lamina.bench.ranks import RankPool, free_port
from megatron_lamina.bench.ranks import run_ranks as spawned_ranks

__all__ = ["free_port", "run_ranks", "spawned_ranks"]

_POOL = RankPool()
atexit.register(_POOL.close)  # runs before multiprocessing's handler (atexit runs last-in first)


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0, threads: int | None = 1):
    """fn(*args) on `world_size` warm ranks; rank 0's value (a rank's failure raises, with its traceback)."""
    return _POOL.run(fn, world_size, *args, timeout=timeout, threads=threads)
