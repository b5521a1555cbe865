"""The previous step's sampled tokens, kept on the device for the next step's inputs.

With asynchronous scheduling the driver plans step n+1 before it has read step n's tokens
back; the decode rows of n+1 are fed from step n's sampled tokens on the device
(step_inputs.py, cuda_graphs.py). The driver samples on tensor-parallel rank 0; at TP > 1
the other model-worker ranks need the tokens as well (every rank embeds every row), so the
driver broadcasts them in the TP group right after sampling and the other ranks receive them
right after running the step: one small collective per step, in stream order on NCCL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class TokenFeed:
    def __init__(self, tp_group: dist.ProcessGroup, device: torch.device):
        self.tp_group, self.device = tp_group, device
        self.last: torch.Tensor | None = None

    def publish(self, tokens: torch.Tensor) -> None:
        """The driver (TP rank 0): this step's sampled tokens [rows] int64."""
        if self.tp_group.size() > 1 and tokens.numel():
            dist.broadcast(tokens, group_src=0, group=self.tp_group)
        self.last = tokens

    def receive(self, rows: int) -> None:
        """Every other TP rank, after running a step that sampled `rows` tokens."""
        tokens = torch.empty(rows, dtype=torch.long, device=self.device)
        if rows:
            dist.broadcast(tokens, group_src=0, group=self.tp_group)
        self.last = tokens
