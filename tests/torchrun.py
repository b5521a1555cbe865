"""Run a launcher for tests: the real `torchrun` (torch.distributed.run) on loopback, or `lamina`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from spawn_ranks import free_port

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: str, nproc: int, *args: str, timeout: float = 300.0, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(ROOT / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **popen)


def lamina(*args: str, timeout: float = 300.0, **popen) -> subprocess.CompletedProcess:
    """`lamina ARGS` (the console script's function, megatron_lamina.cli:main), from the checkout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "megatron_lamina.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **popen)
