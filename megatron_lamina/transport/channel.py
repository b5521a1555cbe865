"""The interface between a model worker's layers and wherever attention runs.

`RemoteAttention` (model/) calls `begin(layer, micro_batch, q, k, v)` as soon as q, k, v of
a layer exist and `finish(pending)` when it needs the output; nothing else crosses the
boundary. `LocalChannel` is the colocated layout: attention runs at once in this process
against a local paged cache, through a callable the engine provides (so model/ and
attention/ never import each other). `P2PChannel` (p2p.py) is the disaggregated layout.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from megatron_lamina.plan import MicroBatch, SequenceChunk


class AttentionChannel(Protocol):
    def begin(self, layer: int, mb: MicroBatch, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor): ...

    def finish(self, pending) -> torch.Tensor: ...


AttendFn = Callable[[int, list[SequenceChunk], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LocalChannel:
    def __init__(self, attend: AttendFn):
        self.attend = attend

    def begin(self, layer, mb, q, k, v):
        return self.attend(layer, mb.chunks, q, k, v)

    def finish(self, pending):
        return pending
