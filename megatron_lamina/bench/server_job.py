"""A real server started, waited for, sampled and stopped: the one server-process controller of
the benchmarks and the tests (tests/server_proc.py builds its servers on it).

`LaunchedServer` starts a launcher command (torchrun launcher/serve.py, or `lamina serve`) in
a session of its own with its output in a log file, waits for `/ready`, finds its ranks (the
launcher's children: they run in sessions of their own), and stops it (SIGTERM, which drains,
for `grace` seconds; then SIGKILL for whatever is left, the ranks included). `ServerJob` is
the benchmarks' server: torchrun launcher/serve.py on a config with `--set` overrides.
`MetricsPoller` samples the server's `/metrics` at an interval during a run; `GpuPoller`
samples the GPU's utilization (NVML, the figure `nvidia-smi` shows) meanwhile. Used by
bench/planner_validation.py, bench/prefix_replay.py and tools/serving_benchmark.py.
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


def proc_stat(pid: int | str) -> tuple[str, int]:
    """(state, parent pid) of a process, from /proc/PID/stat (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def child_pids(parent: int) -> list[int]:
    """The live children of `parent` (for a launcher: its ranks, each in a session of its own)."""
    pids = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and proc_stat(pid)[1] == parent:
                pids.append(int(pid))
        except (OSError, ValueError):
            continue
    return pids


class LaunchedServer:
    """`cmd` (a launcher) in a session of its own, its output in `log_path`; `env` is added to
    this process's environment (with PYTHONUNBUFFERED=1)."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, env: dict[str, str] | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.started = time.monotonic()
        self.log_path, self.log = log_path, open(log_path, "w")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                                     start_new_session=True)
        self.ready_s: float | None = None  # from the launch to /ready answering 200

    def wait_healthy(self, timeout: float):
        """Until /ready answers 200 (/health is 200 while the model loads); returns self."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=2) as resp:
                    if resp.status == 200:
                        self.ready_s = time.monotonic() - self.started
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the server was not healthy within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int | None = 3000) -> str:
        """The log's last `chars` characters (None: all of it)."""
        self.log.flush()
        text = self.log_path.read_text()
        return text if chars is None else text[-chars:]

    def worker_pids(self) -> list[int]:
        """The launcher's children (the ranks); they run in sessions of their own."""
        return child_pids(self.proc.pid)

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM to the launcher (reaches the driver, which drains and exits) and `grace`
        seconds for it; then SIGKILL to whatever is left: the launcher's group and its ranks
        (which run in sessions of their own). `grace` 0: SIGKILL at once."""
        workers = self.worker_pids()
        if self.proc.poll() is None:
            if grace > 0:
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=grace)
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        for pid in workers:  # orphaned by the launcher's death otherwise
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()

    def frontend_pid(self) -> int | None:
        """The HTTP front end's process (a child of rank 0), from its "serving ..." log line."""
        return frontend_pid_in(self.tail(200000))

    def rank_pid(self, rank: int) -> int | None:
        """The rank process with this RANK (a child of the launcher)."""
        for pid in self.worker_pids():
            with contextlib.suppress(OSError):
                if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return pid
        return None

    def driver_pid(self) -> int | None:
        """The rank-0 process (the driver: the engine loop)."""
        return self.rank_pid(0)

    def kill(self) -> None:
        """For a budget watchdog: in-flight requests fail at once (and are counted as failed)."""
        for pid in self.worker_pids() + [self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class ServerJob(LaunchedServer):
    """The benchmarks' server: torchrun launcher/serve.py on `config` with `--set` overrides."""

    def __init__(self, overrides: list[str], config: str, port: int, log_path: Path, cpu: bool, nproc: int = 1):
        super().__init__(launcher_command("serve.py", nproc, config, overrides + [f"server.port={port}"]), port,
                         log_path, {"OMP_NUM_THREADS": "1"} if cpu else None)


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
    0 .. min(devices, GPUs there) - 1 (rank r runs on GPU r mod the count, worker/runtime.py);
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
