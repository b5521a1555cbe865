"""The control plane: the driver's step plans, broadcast to every rank, and the loop that runs them.

Once per step the driver (rank 0) broadcasts a small `StepPlan` (plan.py) over the gloo
`control` group; every other rank runs `serve_plans`, executing each plan with its worker
(model worker or attention worker) until the shutdown plan. A rank waiting for a plan gives
up after the group's timeout (`runtime.step_timeout_s`), so that timeout must measure the
driver's silence, not the length of its work: `PlanSender` (the driver's side) has a thread
that sends an empty plan, a heartbeat, whenever no plan went out for a quarter of the
timeout, whatever the driver's main thread is doing (loading the tokenizer, admitting a
large batch, running a long prefill step, waiting on anything). A rank that dies is found at
the next plan or heartbeat (gloo sees the closed connection); one that hangs, by the step's
own collectives with it, and a driver that dies or hangs, by every other rank's timeout.
Used by `LLMEngine` and the launchers.
"""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from megatron_lamina.engine import plan_columns
from megatron_lamina.plan import StepPlan
from megatron_lamina.topology import ProcessGroups


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


class PlanSender:
    """The driver's end of the control plane: its plans, and heartbeats while it sends none.

    Plans and heartbeats share the `control` group, so one lock orders them (a broadcast is
    two collectives: the size, then the bytes). A heartbeat that fails (a rank died) is kept
    in `failure` and raised by the next `send`, so the engine's loop learns of it even when idle.
    """

    def __init__(self, groups: ProcessGroups, interval_s: float):
        self.groups, self.interval_s = groups, interval_s
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._closed = threading.Event()
        self._thread = None
        if groups.control.size() > 1:
            self._thread = threading.Thread(target=self._beat, name="lamina-heartbeat", daemon=True)
            self._thread.start()

    def send(self, plan: StepPlan) -> None:
        if self.failure is not None:
            raise RuntimeError(f"a rank stopped answering the driver's heartbeat: {self.failure}") from self.failure
        with self._lock:
            broadcast_plan(plan, self.groups)
            self._last = time.monotonic()

    def close(self, last: StepPlan | None = None) -> None:
        """Stop the heartbeats; then send `last` (the shutdown plan), after which no rank listens."""
        self._closed.set()
        if last is not None:
            if self._thread is not None:
                self._thread.join()  # no heartbeat after the shutdown plan
            self.send(last)

    def _beat(self) -> None:
        while not self._closed.wait(self.interval_s / 4):
            with self._lock:
                if self._closed.is_set() or time.monotonic() - self._last < self.interval_s:
                    continue
                try:
                    broadcast_plan(StepPlan(), self.groups)
                except Exception as e:  # noqa: BLE001 - the main thread raises it at its next send
                    self.failure = e
                    return
                self._last = time.monotonic()


def serve_plans(ctx) -> None:
    """Non-driver ranks: execute every plan the driver broadcasts, until shutdown."""
    while True:
        plan = broadcast_plan(None, ctx.groups)
        if plan.shutdown:
            return
        if plan.micro_batches:  # not a heartbeat
            ctx.worker.serve(plan)
