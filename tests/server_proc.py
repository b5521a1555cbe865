"""A real server for tests: `torchrun launcher/serve.py` (or `lamina serve`) on 127.0.0.1, waited
for, torn down, on the benchmarks' controller (bench/server_job.py: `LaunchedServer`); and the
processes a launcher started (`child_pids`, `wait_gone`)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from megatron_lamina.bench.ranks import free_port
from megatron_lamina.bench.server_job import LaunchedServer, child_pids, proc_stat

ROOT = Path(__file__).resolve().parents[1]
# tools/setup.sh's conversion of the default model (SmolLM2-135M-Instruct): what the tests that
# need its real weights or tokenizer, but not a conversion of their own, read.
SETUP_CHECKPOINT = ROOT / "checkpoints" / "smollm2-135m-instruct"
__all__ = ["SETUP_CHECKPOINT", "ServerProcess", "attention_workers", "child_pids", "running_server",
           "setup_checkpoint", "tiny_server_config", "wait_gone"]


def setup_checkpoint() -> Path:
    assert SETUP_CHECKPOINT.is_dir(), "run tools/setup.sh first: it converts the default model"
    return SETUP_CHECKPOINT


def tiny_server_config(tmp_path: Path, checkpoint, **sections) -> tuple[Path, int]:
    """A YAML config for the tiny model; `sections` = {"parallel": {...}, ...} overrides."""
    port = free_port()
    values = {"model": {"checkpoint": str(checkpoint)},
              "parallel": {"tensor_parallel": 1, "attention_workers": 2, "attention_head_groups": 1},
              "scheduler": {"micro_batches": 2, "max_batch_size": 16, "max_prefill_tokens": 16},
              "kv_cache": {"block_size": 4, "num_blocks": 128},
              "runtime": {"step_timeout_s": 20},
              "server": {"port": port}}
    for section, keys in sections.items():
        values[section].update(keys)
    path = tmp_path / f"server-{port}.yaml"
    path.write_text("".join(f"{s}:\n" + "".join(f"  {k}: {v}\n" for k, v in keys.items())
                            for s, keys in values.items()))
    return path, port


def attention_workers(n: int) -> dict:
    """`tiny_server_config` sections for `n` attention workers holding the default two's 1024
    tokens of cache between them: where the layout is not the subject, a server of fewer ranks
    (every rank is a start-up of torch) with the same cache."""
    return {"parallel": {"attention_workers": n}, "kv_cache": {"num_blocks": 256 // n}}


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of `pids` runs; return those still running. A zombie no longer runs,
    unless it is a thread-group leader whose other threads are still exiting: they share its
    files, so its listening socket is still open and a client's connect is accepted, then
    reset (a CI failure of test_lamina_serve_counts_the_ranks_and_they_die_with_it)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if proc_stat(pid)[0] != "Z" or len(os.listdir(f"/proc/{pid}/task")) > 1:
                    alive.append(pid)
            except (OSError, ValueError):
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


LOGS_OF_THIS_TEST: list[Path] = []  # conftest shows their tails when a test fails, then clears it
LIVE_LOGS: list[Path] = []          # of servers not stopped yet (a module's shared server): shown too


class ServerProcess(LaunchedServer):
    def __init__(self, config: Path | None, port: int, nproc: int, log: Path, launcher: str = "torchrun",
                 argv: list[str] | None = None, env: dict[str, str] | None = None):
        """`argv`: `lamina serve ARGV` as a user types it (no config file); `env`: added to ours."""
        LOGS_OF_THIS_TEST.append(log)
        LIVE_LOGS.append(log)
        if argv is not None:
            cmd = [sys.executable, "-m", "megatron_lamina.cli", "serve", *argv]
        elif launcher == "lamina":  # counts the ranks from the config
            cmd = [sys.executable, "-m", "megatron_lamina.cli", "serve", "--config", str(config)]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                   "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                   str(ROOT / "launcher" / "serve.py"), "--config", str(config)]
        super().__init__(cmd, port, log, {"OMP_NUM_THREADS": "1", **(env or {})})

    def wait_healthy(self, timeout: float = 180.0) -> "ServerProcess":
        return super().wait_healthy(timeout)

    def rank_pid(self, rank: int) -> int:
        """PID of the worker process with this RANK (a child of the launcher)."""
        pid = super().rank_pid(rank)
        if pid is None:
            raise LookupError(f"no rank {rank} process")
        return pid

    def output(self) -> str:
        return self.tail(None)

    def wait_logged(self, text: str, timeout: float = 120.0) -> None:
        """Until `text` is in the log; TimeoutError (with the log's end) if it is not within `timeout`."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{text!r} not logged within {timeout:g} s:\n{self.tail()}")
            time.sleep(0.05)

    def frontend_pid(self) -> int:
        """PID of the HTTP front end (a child of rank 0), from its "serving ..." log line."""
        pid = super().frontend_pid()
        if pid is None:
            raise LookupError("no 'serving' line in the log yet")
        return pid

    def stop(self) -> None:
        """SIGKILL at once: the launcher's group and its ranks."""
        if self.log_path in LIVE_LOGS:
            LIVE_LOGS.remove(self.log_path)
        super().stop(grace=0)


@contextlib.contextmanager
def running_server(config: Path, port: int, nproc: int, log: Path):
    """A module's shared server: started, waited for (yields the healthy `ServerProcess`),
    stopped on leaving."""
    proc = ServerProcess(config, port, nproc, log)
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()
