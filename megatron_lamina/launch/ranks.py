"""Starting a job's ranks, and tying each rank's life to its launcher's.

`start_ranks` is what `lamina serve|generate` run once the config is checked: one process per
rank (`python -m megatron_lamina.launch.<program>`), started by torch's own launcher API
(`torch.distributed.launcher.elastic_launch`, what `torchrun --standalone` runs: a c10d
rendezvous on a free loopback port, no restarts), and the exit status of the job: 0, or the
status of the rank that failed first. torch's launcher logs nothing here; a rank that fails
has printed its own error, so the launcher adds one line at most.

`exit_with_parent` is the first thing every rank does (under `lamina` or `torchrun`): the
launcher starts each rank in a session of its own, so a launcher killed with SIGKILL (or its
process group) would leave the ranks running under PID 1, a server still answering and a
batch job still writing. With it the kernel kills the rank when its parent dies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import signal
import sys
import threading
import time
import uuid

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent() -> None:
    """Have this process killed (SIGKILL) when its parent, the launcher, dies."""
    parent = os.getppid()
    if not sys.platform.startswith("linux") or ctypes.CDLL(None, use_errno=True).prctl(
            PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        threading.Thread(target=_watch_parent, args=(parent,), name="lamina-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(1)


def _watch_parent(parent: int) -> None:
    """Where prctl is missing: poll for the parent's death instead."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def require_launcher(program: str, args) -> bool:
    """True under a launcher (RANK is set). Otherwise print the command that starts the job
    (`python launcher/serve.py` alone is one rank without the others) and return False."""
    if "RANK" in os.environ:
        return True
    from megatron_lamina.config import ConfigError, config_from_args

    try:
        ranks = str(config_from_args(args).world_size)
    except ConfigError:
        ranks = "N"
    given = shlex.join(sys.argv[1:])
    print(f"error: launcher/{program}.py runs as one rank of a job; start the job with: lamina {program} {given} "
          f"(or: torchrun --nproc-per-node {ranks} launcher/{program}.py {given})", file=sys.stderr)
    return False


def start_ranks(nproc: int, program: str, argv: list[str], shutdown_timeout_s: float = 30.0) -> int:
    """Run `python -m megatron_lamina.launch.<program> *argv` on `nproc` ranks; their exit status.

    `shutdown_timeout_s`: how long the ranks get after a SIGTERM / SIGINT to the launcher
    (which is passed on to them) before they are killed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):  # each sets its own level at import
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun: ranks must not fight over the cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          shutdown_timeout=int(shutdown_timeout_s) + 1)
    try:
        elastic_launch(config, sys.executable)("-m", f"megatron_lamina.launch.{program}", *argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:
            print(f"error: rank {rank} was killed by {signal.Signals(-failure.exitcode).name}", file=sys.stderr)
            return 1
        return failure.exitcode
    except SignalException as e:
        return 128 + e.sigval
    return 0
