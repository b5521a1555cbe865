"""Ranks for the benchmarks, the profiler and the tests: the one rank spawner, and the
one-rank and torchrun worlds a benchmark runs in.

  * `run_ranks(fn, world_size, *args)`: `fn(*args)` on `world_size` ranks, each a spawned
    process with the environment torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT on loopback), returning rank 0's value; with `here=True` rank 0 is this
    process (the profiler: rank 0 measures, the others follow). A rank that raises or exits
    non-zero fails the call with its traceback; a job that outlives `timeout` is killed
    (never a hang); `hang_s` makes a stuck rank print every thread's stack and exit first.
    Results travel through files (one pickle per rank), not a multiprocessing queue: a queue
    handed to spawned children goes through a socket in the parent's /tmp/pymp-* folder,
    which is one more thing that can vanish under a busy machine.
  * `RankPool`: the same jobs on warm ranks, spawned once and kept between jobs (the tests'
    many short jobs: each spawn imports torch, Megatron and transformers anew, most of a short
    job's cost).
  * `init_one_rank`: this process alone as a torch.distributed world (Megatron's layers want
    a process group even at TP 1): gloo on the CPU, NCCL on GPU 0;
  * `init_torchrun_tp`: under torchrun, one NCCL rank per GPU, all of them one TP group.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
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


def _rank_environment(rank: int, world_size: int, port: int, threads: int | None) -> dict[str, str]:
    env = dict(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run_rank(fn, args, rank: int, world_size: int, port: int, threads: int | None) -> tuple[str, Any]:
    """fn(*args) as one rank: ("ok", its value on rank 0) or ("error", the traceback)."""
    os.environ.update(_rank_environment(rank, world_size, port, threads))
    if threads:
        torch.set_num_threads(threads)
    try:
        value = fn(*args)
        return "ok", value if rank == 0 else None
    except BaseException:
        return "error", traceback.format_exc()


def _spawned_rank(fn, args, rank, world_size, port, results_dir, threads, hang_s):
    if hang_s:
        import faulthandler

        faulthandler.dump_traceback_later(hang_s, exit=True)  # a hang prints where, then exits
    outcome = ("error", "no result")
    try:
        outcome = _run_rank(fn, args, rank, world_size, port, threads)
    finally:
        path = Path(results_dir) / f"rank{rank}.pkl"
        path.with_suffix(".tmp").write_bytes(pickle.dumps(outcome))
        path.with_suffix(".tmp").rename(path)
        if dist.is_initialized():
            dist.destroy_process_group()
    if outcome[0] == "error":
        print(f"rank {rank} failed:\n{outcome[1]}", file=sys.stderr, flush=True)
        os._exit(1)


@contextlib.contextmanager
def _restored_environment():
    saved, threads = dict(os.environ), torch.get_num_threads()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)


def _await_results(paths: dict[int, Path], exitcode: Callable[[int], int | None], deadline: float,
                   poll_s: float, world_size: int, results: dict[int, tuple]) -> dict[int, tuple]:
    """`results` (answers known already) completed with the ranks' (status, value) answers
    from their result files `paths`: until all `world_size` answered, one failed (then two
    seconds for the others to report their view of it), a rank exited without answering, or
    the deadline passed."""

    def collect():
        for rank, path in paths.items():
            if rank not in results and path.exists():
                results[rank] = pickle.loads(path.read_bytes())

    while len(results) < world_size and time.monotonic() < deadline:
        collect()
        if any(status == "error" for status, _ in results.values()):
            time.sleep(2)
            collect()
            break
        for rank in paths:
            code = exitcode(rank)
            if rank not in results and code is not None:
                collect()  # its answer may have landed just before it exited
                results.setdefault(rank, ("error", f"exited with code {code}"))
        time.sleep(poll_s)
    return results


def _failures(results: dict[int, tuple], world_size: int, timeout: float) -> list[str]:
    """Each failed rank's report, or the timeout when some ranks never answered."""
    errors = [f"rank {r}:\n{value}" for r, (status, value) in sorted(results.items()) if status == "error"]
    if len(results) < world_size and not errors:
        errors.append(f"timed out after {timeout}s; ranks that reported: {sorted(results)}")
    return errors


def run_ranks(fn: Callable, world_size: int, *args, timeout: float = 300.0, threads: int | None = 1,
              hang_s: float | None = None, here: bool = False) -> Any:
    """fn(*args) on `world_size` ranks; rank 0's return value (the module's docstring).
    `threads`: torch and OpenMP threads per rank (None: torch's default); `here`: rank 0 runs
    in this process, its torchrun environment and thread count put back after it."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    first = 1 if here else 0
    with tempfile.TemporaryDirectory(prefix="ranks-") as results_dir:
        procs = {r: ctx.Process(target=_spawned_rank, args=(fn, args, r, world_size, port, results_dir, threads,
                                                            hang_s))
                 for r in range(first, world_size)}
        for p in procs.values():
            p.start()
        deadline = time.monotonic() + timeout
        results: dict[int, tuple] = {}
        error_here = None
        try:
            if here:
                with _restored_environment():
                    os.environ.update(_rank_environment(0, world_size, port, threads))
                    if threads:
                        torch.set_num_threads(threads)
                    try:
                        results[0] = ("ok", fn(*args))
                    except BaseException as e:
                        error_here = e
                        results[0] = ("error", traceback.format_exc())
                    finally:
                        if dist.is_initialized():
                            dist.destroy_process_group()
            paths = {r: Path(results_dir) / f"rank{r}.pkl" for r in procs}
            results = _await_results(paths, lambda r: procs[r].exitcode, deadline, 0.05, world_size, results)
        finally:
            for p in procs.values():
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()
    if error_here is not None:
        raise error_here
    errors = _failures(results, world_size, timeout)
    if errors:
        raise RuntimeError("\n".join(errors))
    return results[0][1]


def _pooled_rank(rank: int, pool_dir: str, parent: int) -> None:
    """A warm rank: job n is the file job{n}.pkl (fn, args, world size, port, threads, the
    caller's environment and working directory); a rank below the job's world size runs it
    as `run_ranks` would and answers in rank{rank}-job{n}.pkl, the others skip it. A job with
    no function, or the parent gone, ends the loop; a failed job ends the process."""
    n = 0
    while True:
        n += 1
        path = Path(pool_dir) / f"job{n}.pkl"
        while not path.exists():
            if os.getppid() != parent:
                return
            time.sleep(0.02)
        try:
            fn, args, world_size, port, threads, environ, cwd = pickle.loads(path.read_bytes())
        except BaseException:
            fn, world_size, outcome = _unreadable, rank + 1, ("error", traceback.format_exc())
        if fn is None:
            return
        if rank >= world_size:
            continue
        if fn is not _unreadable:
            outcome = _pooled_job(fn, args, rank, world_size, port, threads, environ, cwd)
        result = Path(pool_dir) / f"rank{rank}-job{n}.pkl"
        result.with_suffix(".tmp").write_bytes(pickle.dumps(outcome))
        result.with_suffix(".tmp").rename(result)
        if outcome[0] == "error":
            print(f"rank {rank} failed:\n{outcome[1]}", file=sys.stderr, flush=True)
            os._exit(1)
        del outcome
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # an idle rank holds no device memory while smaller jobs run


def _unreadable():
    """Marks a job this rank could not unpickle."""


def _pooled_job(fn, args, rank, world_size, port, threads, environ, cwd) -> tuple[str, Any]:
    with _restored_environment():
        # What a fresh spawn would see: the caller's environment and directory now, not at spawn.
        os.environ.clear()
        os.environ.update(environ)
        here = os.getcwd()
        try:
            os.chdir(cwd)
            return _run_rank(fn, args, rank, world_size, port, threads)
        finally:
            os.chdir(here)
            if dist.is_initialized():
                dist.destroy_process_group()


class RankPool:
    """`run(fn, world_size, *args)`: what `run_ranks(fn, world_size, *args)` does, on ranks
    spawned at the first job that needs them and kept for the next (rank r of every job is the
    same process). A job that fails or times out ends the pool (a rank may be stuck in a
    collective); the next job spawns fresh ranks. Jobs and answers travel through files, as in
    `run_ranks`. `close()` ends the ranks."""

    def __init__(self):
        self._dir: str | None = None
        self._procs: list = []
        self._jobs = 0

    def run(self, fn: Callable, world_size: int, *args, timeout: float = 300.0, threads: int | None = 1) -> Any:
        import multiprocessing as mp

        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="rank-pool-")
        ctx = mp.get_context("spawn")
        while len(self._procs) < world_size:
            proc = ctx.Process(target=_pooled_rank, args=(len(self._procs), self._dir, os.getpid()))
            proc.start()
            self._procs.append(proc)
        self._post((fn, args, world_size, free_port(), threads, dict(os.environ), os.getcwd()))
        results_of = {r: Path(self._dir) / f"rank{r}-job{self._jobs}.pkl" for r in range(world_size)}
        try:
            results = _await_results(results_of, lambda r: self._procs[r].exitcode, time.monotonic() + timeout,
                                     0.02, world_size, {})
        except BaseException:  # interrupted (a test's timeout): the ranks may still be in the job
            self.close(kill=True)
            raise
        for path in results_of.values():
            path.unlink(missing_ok=True)
        errors = _failures(results, world_size, timeout)
        if errors:
            self.close(kill=True)
            raise RuntimeError("\n".join(errors))
        return results[0][1]

    def _post(self, job: tuple) -> None:
        data = pickle.dumps(job)  # first: a job that cannot be pickled takes no number
        self._jobs += 1
        path = Path(self._dir) / f"job{self._jobs}.pkl"
        path.with_suffix(".tmp").write_bytes(data)
        path.with_suffix(".tmp").rename(path)

    def close(self, kill: bool = False) -> None:
        """End every rank: a job with no function, then a kill for any still running (at
        once with `kill`: after a failed job a rank may wait in a collective for ever)."""
        if self._procs:
            self._post((None, (), 0, 0, None, {}, None))
            for proc in self._procs:
                proc.join(timeout=0 if kill else 5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        if self._dir is not None:
            import shutil

            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir, self._procs, self._jobs = None, [], 0
