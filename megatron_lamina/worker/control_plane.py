"""The control plane: the driver's step plans, broadcast to every rank, the loop that runs them,
and the heartbeat that tells every rank the driver is alive.

Once per step the driver (rank 0) broadcasts a small `StepPlan` (plan.py) over the gloo
`control` group; every other rank runs `serve_plans`, executing each plan with its worker
(model worker or attention worker) until the shutdown plan.

`runtime.step_timeout_s` measures a rank's silence, not the length of the driver's work.
From the end of start-up (`runtime.start_rank`) the driver's `Heartbeat` beats every other
rank every quarter of the timeout, whatever its main thread is doing (loading the tokenizer,
admitting a large batch, a long prefill step, a front end that stopped reading): each beat is
a one-number all-reduce on a gloo pair of its own (topology.py), so a beat never waits behind
another rank's step. On every other rank a `Watchdog` thread answers the beats; while they
come, the rank waits for its next plan however long (its end of `control` has no timeout to
speak of). Faults, each found within `step_timeout_s`:
  * the driver dies or hangs: every other rank's watchdog misses its beat (a closed
    connection at once, silence after the timeout), prints one `error:` line and ends its
    process (exit 1);
  * another rank dies or hangs: the driver's beat to it fails the same way; `PlanSender`
    raises it at the engine loop's next `check` or plan (a step in progress that does not
    involve that rank ends first; one that does fails by its own exchanges, whose waits, one
    layer's each, keep the step's timeout, as the driver's plans to a rank do).
The shutdown plan is followed by a last beat, a goodbye, so no rank takes the driver's exit
for a fault. Used by `LLMEngine`, `runtime.start_rank` and the launchers.
"""

from __future__ import annotations

import os
import re
import sys
import threading

import torch
import torch.distributed as dist

from megatron_lamina.worker import plan_columns
from megatron_lamina.plan import StepPlan
from megatron_lamina.topology import ProcessGroups

BEATS_PER_TIMEOUT = 4  # a rank is given up after this many beats missed in a row
_ALIVE, _GOODBYE = 1, 0  # a beat's value; the pair's all-reduce takes the minimum


def broadcast_plan(plan: StepPlan | None, groups: ProcessGroups) -> StepPlan:
    """The driver's `plan` to every rank of `control` (the others pass None and get it back):
    as integer columns (plan_columns.py), not pickled; its length first, then the columns."""
    if groups.control.size() == 1:  # a lone colocated rank: nobody to tell
        return plan
    driver = plan is not None
    columns = torch.from_numpy(plan_columns.encode(plan)) if driver else None
    size = torch.tensor([columns.numel() if driver else 0], dtype=torch.int64)
    dist.broadcast(size, src=0, group=groups.control)
    if not driver:
        columns = torch.empty(int(size), dtype=torch.int64)
    dist.broadcast(columns, src=0, group=groups.control)
    return plan if driver else plan_columns.decode(columns.numpy())


class Heartbeat:
    """The driver's end: one thread per other rank, beating its pair (`groups.heartbeat`)
    every `timeout_s / BEATS_PER_TIMEOUT`; the first beat that fails (`timeout_s` without an
    answer, or a closed connection) is kept in `failure`, naming the rank (`names`)."""

    def __init__(self, pairs: dict[int, dist.ProcessGroup], timeout_s: float, names: dict[int, str]):
        self.timeout_s = timeout_s
        self.failure: str | None = None
        self._stop = threading.Event()
        self._goodbye = False
        self._threads = [threading.Thread(target=self._beat, args=(pair, names[peer]), daemon=True,
                                          name=f"lamina-heartbeat-{peer}") for peer, pair in pairs.items()]
        for thread in self._threads:
            thread.start()

    def close(self, goodbye: bool) -> None:
        """Stop beating; with `goodbye` (after the shutdown plan) each rank gets a last beat
        that ends its watchdog, and this returns once they all had it."""
        self._goodbye = goodbye
        self._stop.set()
        if goodbye:
            for thread in self._threads:
                thread.join()

    def _beat(self, pair: dist.ProcessGroup, name: str) -> None:
        while True:
            ending = self._stop.wait(self.timeout_s / BEATS_PER_TIMEOUT)
            if ending and not self._goodbye:
                return
            beat = torch.tensor([_GOODBYE if ending else _ALIVE])
            try:
                dist.all_reduce(beat, op=dist.ReduceOp.MIN, group=pair)
            except Exception as e:  # noqa: BLE001 - the engine loop raises it (PlanSender.check)
                if not ending and self.failure is None:
                    self.failure = (f"{name} stopped answering the driver's heartbeat (runtime.step_timeout_s = "
                                    f"{self.timeout_s:g} s): {_reason(e)}")
                return
            if ending:
                return


class Watchdog:
    """A non-driver rank's end: a thread that answers the driver's beats on this rank's pair.
    A beat missed (the driver silent for `timeout_s`, or gone) ends the process with one
    `error:` line naming this rank (`who`), unless its main thread is already reporting a
    failure of its own (`claim_report`), or the shutdown plan came (`close`)."""

    def __init__(self, pair: dist.ProcessGroup, timeout_s: float, who: str):
        self.pair, self.timeout_s, self.who = pair, timeout_s, who
        self._ending = threading.Event()
        self._report = threading.Lock()  # taken by whichever thread tells of a failure, once
        self._thread = threading.Thread(target=self._watch, name="lamina-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """The shutdown plan came: wait for the driver's goodbye (a beat at most away)."""
        self._ending.set()
        self._thread.join()

    def claim_report(self) -> bool:
        """The main thread failed: True when it should report it, False when the watchdog
        already does (and is ending the process)."""
        return self._report.acquire(blocking=False)

    def _watch(self) -> None:
        while True:
            beat = torch.tensor([_ALIVE])
            try:
                dist.all_reduce(beat, op=dist.ReduceOp.MIN, group=self.pair)
            except Exception as e:  # noqa: BLE001 - the driver is silent or gone
                if self._ending.is_set() or not self.claim_report():
                    return  # shutting down anyway, or the main thread reports its own failure
                print(f"error: {self.who} stopped: the driver's heartbeat stopped (rank 0 exited, or was silent "
                      f"for runtime.step_timeout_s = {self.timeout_s:g} s): {_reason(e)}", file=sys.stderr, flush=True)
                os._exit(1)  # the main thread may be in a collective that would wait for days
            if beat.item() == _GOODBYE:
                return


def start_liveness(groups: ProcessGroups, rank: int, timeout_s: float, names: dict[int, str]):
    """Right after start-up: the driver's `Heartbeat`, another rank's `Watchdog` (None alone)."""
    if not groups.heartbeat:
        return None
    if rank == 0:
        return Heartbeat(groups.heartbeat, timeout_s, names)
    return Watchdog(groups.heartbeat[rank], timeout_s, names[rank])


class PlanSender:
    """The driver's end of the control plane: its plans, and what its heartbeat found."""

    def __init__(self, groups: ProcessGroups, heartbeat: Heartbeat | None):
        self.groups, self.heartbeat = groups, heartbeat

    def check(self) -> None:
        """Raise if a rank stopped answering the heartbeat (the engine loop, each turn)."""
        if self.heartbeat is not None and self.heartbeat.failure is not None:
            raise RuntimeError(self.heartbeat.failure)

    def send(self, plan: StepPlan) -> None:
        self.check()
        broadcast_plan(plan, self.groups)

    def close(self, last: StepPlan | None = None) -> None:
        """Send `last` (the shutdown plan), then the goodbye beats; without `last` (a rank
        failed) just stop beating: the other ranks' watchdogs end them."""
        sent = False
        try:
            if last is not None:
                self.send(last)
                sent = True
        finally:
            if self.heartbeat is not None:
                self.heartbeat.close(goodbye=sent)


def serve_plans(ctx) -> None:
    """Non-driver ranks: execute every plan the driver broadcasts, until shutdown."""
    watchdog = ctx.liveness
    try:
        while True:
            plan = broadcast_plan(None, ctx.groups)
            if plan.shutdown:
                break
            if plan.micro_batches:
                ctx.worker.serve(plan)
    except BaseException:
        if watchdog is not None and not watchdog.claim_report():
            threading.Event().wait()  # the watchdog is telling of the driver and ending the process
        raise
    if watchdog is not None:
        watchdog.close()


def _reason(error: BaseException) -> str:
    """A gloo error's last line, without the source file it starts with, and its type."""
    lines = str(error).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[-1]) if lines else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
