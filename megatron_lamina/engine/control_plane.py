"""The control plane: the driver's step plans, broadcast to every rank, and the loop that runs them.

Once per step the driver (rank 0) broadcasts a small `StepPlan` (plan.py) over the gloo
`control` group; every other rank runs `serve_plans`, executing each plan with its worker
(model worker or attention worker) until the shutdown plan. When idle the driver sends an
empty plan as a heartbeat, so a dead or stopped rank is found within the group's timeout
(`runtime.step_timeout_s`). Used by `LLMEngine` and the launchers.
"""

from __future__ import annotations

import torch.distributed as dist

from megatron_lamina.plan import StepPlan
from megatron_lamina.topology import ProcessGroups


def broadcast_plan(plan: StepPlan | None, groups: ProcessGroups) -> StepPlan:
    if groups.control.size() == 1:  # a lone colocated rank: nobody to tell (and no pickling)
        return plan
    box = [plan]
    dist.broadcast_object_list(box, src=0, group=groups.control)
    return box[0]


def serve_plans(ctx) -> None:
    """Non-driver ranks: execute every plan the driver broadcasts, until shutdown."""
    while True:
        plan = broadcast_plan(None, ctx.groups)
        if plan.shutdown:
            return
        if plan.micro_batches:  # not a heartbeat
            ctx.worker.serve(plan)
