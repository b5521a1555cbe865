"""A real server for tests: `torchrun launcher/serve.py` (or `lamina serve`) on 127.0.0.1, waited
for, torn down; and the processes a launcher started (`child_pids`, `wait_gone`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from spawn_ranks import free_port

from megatron_lamina.bench.server_job import frontend_pid_in

ROOT = Path(__file__).resolve().parents[1]


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


def child_pids(parent: int) -> list[int]:
    """The live children of `parent` (for a launcher: its ranks, each in a session of its own)."""
    pids = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and _stat(pid)[1] == parent:
                pids.append(int(pid))
        except (OSError, ValueError):
            continue
    return pids


def _stat(pid) -> tuple[str, int]:
    """(state, parent pid) of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


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
                if _stat(pid)[0] != "Z" or len(os.listdir(f"/proc/{pid}/task")) > 1:
                    alive.append(pid)
            except (OSError, ValueError):
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


LOGS_OF_THIS_TEST: list[Path] = []  # conftest shows their tails when a test fails, then clears it
LIVE_LOGS: list[Path] = []          # of servers not stopped yet (a module's shared server): shown too


class ServerProcess:
    def __init__(self, config: Path | None, port: int, nproc: int, log: Path, launcher: str = "torchrun",
                 argv: list[str] | None = None, env: dict[str, str] | None = None):
        """`argv`: `lamina serve ARGV` as a user types it (no config file); `env`: added to ours."""
        self.url, self.log_path = f"http://127.0.0.1:{port}", log
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
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {})),
                                     start_new_session=True)

    def wait_healthy(self, timeout: float = 180.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:  # /health is 200 while loading
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy in {timeout}s:\n{self.output()[-3000:]}")

    def rank_pid(self, rank: int) -> int:
        """PID of the worker process with this RANK (a child of torchrun)."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"launcher/serve.py" in cmdline and f"RANK={rank}".encode() in env \
                    and self._parent(pid) == self.proc.pid:
                return int(pid)
        raise LookupError(f"no rank {rank} process")

    @staticmethod
    def _parent(pid: str) -> int:
        return _stat(pid)[1]

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def frontend_pid(self) -> int:
        """PID of the HTTP front end (a child of rank 0), from its "serving ..." log line."""
        pid = frontend_pid_in(self.output())
        if pid is None:
            raise LookupError("no 'serving' line in the log yet")
        return pid

    def worker_pids(self) -> list[int]:
        """The launcher's children (the ranks); they run in sessions of their own."""
        return child_pids(self.proc.pid)

    def stop(self) -> None:
        if self.log_path in LIVE_LOGS:
            LIVE_LOGS.remove(self.log_path)
        workers = self.worker_pids()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        for pid in workers:  # orphaned by torchrun's death otherwise
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
