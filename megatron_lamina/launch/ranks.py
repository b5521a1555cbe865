"""Starting a job's ranks, and tying each rank's life to its launcher's.

`start_ranks` is what `lamina serve|generate` run once the config is checked: one process per
rank (`python -m megatron_lamina.launch.<program>`), started by torch elastic's agent as
`torchrun --standalone` starts them (a c10d rendezvous on a free loopback port, no restarts;
`agent.py`, which only shortens the agents' exit barrier), and the exit status of the job: 0,
or the status of the rank that failed first. torch's launcher logs nothing here; a rank that
fails has printed its own error, so the launcher adds one line at most.

`exit_with_parent` is the first thing every rank does (under `lamina` or `torchrun`): the
launcher starts each rank in a session of its own, so a launcher killed with SIGKILL (or its
process group) would leave the ranks running under PID 1, a server still answering and a
batch job still writing. With it the kernel kills the rank when its parent dies. `end_rank`
is the last: the rank's exit status, its output flushed, without Python's teardown.
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
from typing import NoReturn

from megatron_lamina.launch.roll_call import STALL_S

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


def end_rank(code: int) -> NoReturn:
    """End this rank now with `code`. Python's teardown of torch and Megatron takes seconds,
    which the launcher (and every other machine, at the job's end) would wait for, and a rank
    has nothing to tear down once its work is closed (the driver's output file included); a
    rank whose peer failed must not wait on a collective either."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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


def threads_per_rank(nproc: int) -> int:
    """Intra-op threads of each of `nproc` ranks on this machine: its cores shared out."""
    return max(1, len(os.sched_getaffinity(0)) // nproc)


def start_ranks(nproc: int, program: str, argv: list[str], shutdown_timeout_s: float = 30.0,
                node=None, cfg=None) -> int:
    """Run `python -m megatron_lamina.launch.<program> *argv` on `nproc` ranks; their exit status.

    `shutdown_timeout_s`: how long the ranks get after a SIGTERM / SIGINT to the launcher
    (which is passed on to them) before they are killed. `node` (a `nodes.NodeLaunch`, with
    the job's `cfg`): this machine's part of a multi-machine job; the rendezvous waits for
    every machine, and a machine that never joins or is lost is named (`roll_call.py`)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig

    from megatron_lamina.launch.agent import run_agent

    for name in list(logging.root.manager.loggerDict):  # each sets its own level at import
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun: ranks must not fight over the cores
        os.environ["OMP_NUM_THREADS"] = str(threads_per_rank(nproc))
    several = node is not None and node.several
    if several:
        # Node 0's launcher serves the rendezvous store itself (every agent, its own included, is
        # a client), so the store lives until this process ends, after the other machines left.
        store = _serve_store(node) if node.hosts_store else None
        config = LaunchConfig(min_nodes=node.nnodes, max_nodes=node.nnodes, nproc_per_node=nproc,
                              run_id=node.rdzv_id, rdzv_backend="c10d", rdzv_endpoint=node.endpoint,
                              rdzv_configs={"join_timeout": node.rdzv_timeout_s + 2 * STALL_S, "is_host": False,
                                            # a machine cut off from node 0 gives up on the store soon
                                            "read_timeout": STORE_READ_TIMEOUT_S, "close_timeout": STORE_READ_TIMEOUT_S},
                              local_addr=node.address, max_restarts=0, shutdown_timeout=int(shutdown_timeout_s) + 1)
        roll = _roll_call(node, cfg).start()
        watch = threading.Thread(target=_watch, args=(roll, node, cfg), daemon=True)
        watch.start()
    else:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                              rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                              shutdown_timeout=int(shutdown_timeout_s) + 1)
    code, reason = 0, "done"
    try:
        run_agent(config, sys.executable, ["-m", f"megatron_lamina.launch.{program}", *argv])
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code, reason = (1 if failure.exitcode < 0 else failure.exitcode), "its ranks failed"
        if several:
            lost = _lost_node(roll, node, cfg)
            if lost is not None:
                return lost
        if failure.exitcode < 0:
            print(f"error: rank {rank} was killed by {signal.Signals(-failure.exitcode).name}", file=sys.stderr)
    except SignalException as e:
        code, reason = 128 + e.sigval, "stopped by a signal"
    except RendezvousError:
        if not several:
            raise
        if roll.missing():
            _report_missing(roll, node, cfg)
            code, reason = 1, "the rendezvous timed out"
        else:  # the job had assembled: the store (node 0) went away under this machine's ranks
            lost = _lost_node(roll, node, cfg)
            code, reason = (1, "the rendezvous store failed") if lost is None else (lost, "node 0 was lost")
    finally:
        if several:
            roll.leave(reason)
            if store is not None:
                staying = roll.wait_others(timeout_s=shutdown_timeout_s)
                if staying:  # their agents lose the store under them, and stop
                    from megatron_lamina.launch.nodes import node_name

                    print(f"lamina: {', '.join(node_name(cfg, n) for n in staying)} had not left "
                          f"{shutdown_timeout_s:g} s after this machine's ranks ended; the rendezvous closes",
                          file=sys.stderr, flush=True)
    return code


# ---- several machines ------------------------------------------------------------------------
STORE_LOST_S = 20  # the longest a store may be silent under an assembled job before node 0 is called lost (_watch)
STORE_READ_TIMEOUT_S = 10  # torch elastic's default (60 s) kept a cut-off machine's agent a minute per read
LOST_NODE_EXIT = 10  # a multi-machine job that lost node R exits with LOST_NODE_EXIT + R


def _serve_store(node):
    from datetime import timedelta

    from torch.distributed import TCPStore

    from megatron_lamina.launch.nodes import split_endpoint

    host, port = split_endpoint(node.endpoint)
    try:
        return TCPStore(host, port, is_master=True, multi_tenant=True, wait_for_workers=False,
                        timeout=timedelta(seconds=node.rdzv_timeout_s))
    except Exception as e:  # the port is taken (another job, or a launcher left behind)
        print(f"error: --rdzv-endpoint {node.endpoint}: cannot serve the rendezvous there ({str(e).splitlines()[0]})",
              file=sys.stderr, flush=True)
        sys.exit(2)


def _roll_call(node, cfg):
    from megatron_lamina.launch.nodes import node_name, split_endpoint
    from megatron_lamina.launch.roll_call import RollCall

    host, port = split_endpoint(node.endpoint)
    entry = {"name": node_name(cfg, node.node_rank), "address": node.address}
    return RollCall(host, port, node.rdzv_id, node.nnodes, node.node_rank, entry)


def _watch(roll, node, cfg) -> None:
    """While torch elastic runs this machine's part. Before the job assembles: at --rdzv-timeout,
    a machine still missing is named in one `error:` line, and this launcher exits (nothing has
    started here yet). After: a machine other than node 0 that loses the store (node 0 gone,
    or this machine cut off) names it and exits, its ranks with it (torch's agent would wait on
    the store for minutes). The store gets the time the job gives a silent peer
    (runtime.step_timeout_s, after which this machine's ranks stop on the driver's silence and
    say so) and STALL_S more, so that their lines come before this one; STORE_LOST_S at most."""
    deadline = time.monotonic() + node.rdzv_timeout_s
    while roll.missing():
        if time.monotonic() >= deadline:
            _report_missing(roll, node, cfg)
            roll.leave("the rendezvous timed out")
            sys.stderr.flush()
            os._exit(1)
        time.sleep(0.5)
    if node.hosts_store:
        return
    lost_after = min(STORE_LOST_S, cfg.runtime.step_timeout_s + STALL_S)
    while roll.silent_for() < lost_after:
        time.sleep(0.5)
    code = _lost_node(roll, node, cfg)
    sys.stderr.flush()
    os._exit(code if code is not None else 1)


def _report_missing(roll, node, cfg) -> None:
    from megatron_lamina.launch.nodes import node_name

    missing = roll.missing()
    if not roll.entries:  # the store never answered: the machine that hosts it is not there
        roll.say(f"error: no machine answered at the rendezvous endpoint {node.endpoint} within "
              f"{node.rdzv_timeout_s:g} s: node 0, which serves it, never started, or the address is wrong")
        return
    names = ", ".join(node_name(cfg, n) for n in missing) or "a machine"
    roll.say(f"error: {names} never joined the rendezvous at {node.endpoint} within {node.rdzv_timeout_s:g} s "
          f"(--rdzv-timeout); start it with --node-rank {missing[0] if missing else 'R'}")


def _lost_node(roll, node, cfg) -> int | None:
    """After this machine's ranks failed: name the machine that was lost, if one was (its
    exit status), else None."""
    from megatron_lamina.launch.nodes import node_name

    lost, silent = roll.verdict()
    if lost:
        gone = lost[0]
        address = roll.entries.get(gone, {}).get("address", "?")
        roll.say(f"error: {node_name(cfg, gone)} at {address} was lost (its launcher stopped answering); "
              f"this machine's ranks stopped")
        return LOST_NODE_EXIT + gone
    if silent and not node.hosts_store:  # node 0 serves the store
        gone = 0
        roll.say(f"error: {node_name(cfg, gone)}, which hosts the rendezvous at {node.endpoint}, was lost "
              f"(or this machine was cut off from it); this machine's ranks stopped")
        return LOST_NODE_EXIT + gone
    return None
