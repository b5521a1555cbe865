"""A real server for the benchmark tools: `torchrun launcher/serve.py`, waited for, sampled, stopped.

`ServerJob` starts the launcher in a session of its own with its output in a log file, waits
for `/ready`, and stops it (SIGTERM, which drains; then SIGKILL for whatever is left,
torchrun's workers included, which run in sessions of their own). `MetricsPoller` samples
the server's `/metrics` at an interval during a run; `GpuPoller` samples the GPU's
utilization (NVML, the figure `nvidia-smi` shows) meanwhile. Used by tools/validate_planner.py
and tools/serving_benchmark.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from megatron_lamina.bench.ranks import free_port

ROOT = Path(__file__).resolve().parents[2]


def launcher_command(launcher: str, nproc: int, config: str, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(ROOT / "launcher" / launcher), "--config", config]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


class ServerJob:
    """torchrun launcher/serve.py in a session of its own, its output in a log file."""

    def __init__(self, overrides: list[str], config: str, port: int, log_path: Path, cpu: bool, nproc: int = 1):
        self.url = f"http://127.0.0.1:{port}"
        cmd = launcher_command("serve.py", nproc, config, overrides + [f"server.port={port}"])
        env = dict(os.environ, PYTHONUNBUFFERED="1", **({"OMP_NUM_THREADS": "1"} if cpu else {}))
        self.started = time.monotonic()
        self.log_path, self.log = log_path, open(log_path, "w")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                     start_new_session=True)
        self.ready_s: float | None = None  # from the launch to /ready answering 200

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=2) as resp:
                    if resp.status == 200:
                        self.ready_s = time.monotonic() - self.started
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the server was not healthy within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-chars:]

    def _workers(self) -> list[int]:
        pids = []
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) \
                        == self.proc.pid:
                    pids.append(int(pid))
            except (OSError, ValueError):
                continue
        return pids

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM to torchrun (reaches the driver, which drains and exits); then SIGKILL to
        whatever is left: torchrun's group and its workers (which run in sessions of their own)."""
        workers = self._workers()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()

    def frontend_pid(self) -> int | None:
        """The HTTP front end's process (a child of rank 0), from its "serving ..." log line."""
        return frontend_pid_in(self.tail(200000))

    def driver_pid(self) -> int | None:
        """The rank-0 process (the driver: the engine loop), by its RANK."""
        for pid in self._workers():
            with contextlib.suppress(OSError):
                if b"RANK=0" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return pid
        return None

    def kill(self) -> None:
        """For a budget watchdog: in-flight requests fail at once (and are counted as failed)."""
        for pid in self._workers() + [self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def frontend_pid_in(log: str) -> int | None:
    """The front end's pid in a server's log (server/frontend.py prints it when it serves)."""
    match = re.search(r"HTTP front end pid (\d+)", log)
    return int(match.group(1)) if match else None


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process, from /proc (Linux)."""
    ticks, out = os.sysconf("SC_CLK_TCK"), {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def server_cpu(engine_pid: int, frontend_pid: int | None, before: dict, after: dict, seconds: float,
               tokens: int) -> dict:
    """Where the server's host time went over a window, from `thread_cpu_s` of both processes
    ({pid: {tid: s}} before and after): rank 0's main thread (the engine loop) against its
    other threads (the communication libraries' own), and the HTTP front end's process (all
    its threads); as shares of one core, and the front end's per output token."""
    def spent(pid: int) -> dict[int, float]:
        return {tid: v - before.get(pid, {}).get(tid, 0.0) for tid, v in after.get(pid, {}).items()}

    engine = spent(engine_pid)
    loop = engine.get(engine_pid, 0.0)
    front = sum(spent(frontend_pid).values()) if frontend_pid else None
    return {"engine_loop_core_share": loop / seconds,
            "engine_other_threads_core_share": (sum(engine.values()) - loop) / seconds,
            "frontend_core_share": None if front is None else front / seconds,
            "frontend_us_per_token": front / tokens * 1e6 if front is not None and tokens else None}


def read_metrics(url: str) -> dict[str, float]:
    """The server's /metrics as {name{labels}: value}."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


class _Poller:
    def __init__(self, interval: float):
        self.interval, self.samples = interval, []  # (time.monotonic(), value)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic(), self.sample()))

    def sample(self):
        raise NotImplementedError

    def stop(self) -> list:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples


class MetricsPoller(_Poller):
    """Samples the server's /metrics every `interval` seconds."""

    def __init__(self, url: str, interval: float = 1.0):
        self.url = url
        super().__init__(interval)

    def sample(self) -> dict[str, float]:
        return read_metrics(self.url)


class GpuPoller(_Poller):
    """GPU utilization (a fraction: NVML's percent / 100) every `interval` seconds, through
    NVML: the share of the sample period in which a kernel ran. `devices` ranks: the GPUs
    0 .. min(devices, GPUs there) - 1 (rank r runs on GPU r mod the count, engine/runtime.py);
    each sample is their mean, `per_device_between` gives each one's."""

    def __init__(self, devices: int = 1, interval: float = 0.1):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(min(devices, pynvml.nvmlDeviceGetCount()))]
        self.per_device: list[tuple[float, list[float]]] = []
        super().__init__(interval)

    def sample(self) -> float:
        values = [self.nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100 for h in self.handles]
        self.per_device.append((time.monotonic(), values))
        return sum(values) / len(values)

    def per_device_between(self, start: float, end: float) -> list[float | None]:
        return [mean_between([(t, v[i]) for t, v in self.per_device], start, end) for i in range(len(self.handles))]


def mean_between(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    values = [v for t, v in samples if start <= t <= end]
    return sum(values) / len(values) if values else None
