"""The interface between a model worker's pipeline and wherever attention runs.

The pipeline (worker/pipeline.py) calls `prepare(micro_batch)` once per micro-batch and
step (host arrays the channel needs on the device, copied with the rest of the step's
inputs), then, per layer, `begin(layer, context, q, k, v)` as soon as q, k, v exist and
`finish(pending)` when it needs the output; nothing else crosses the boundary.
`LocalChannel` is the colocated layout: attention runs at once in this process against a
local paged cache, through the attention backend the worker factory provides (so model/ and
attention/ never import each other). `P2PChannel` (p2p.py) is the disaggregated layout.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from megatron_lamina.host_to_device import HostArrays
from megatron_lamina.plan import MicroBatch, SequenceChunk


class AttentionBackend(Protocol):
    """attention/reference.ReferenceAttention (CPU) or attention/gpu.PagedAttention (CUDA)."""

    def host_index(self, chunks: list[SequenceChunk]) -> HostArrays: ...

    def __call__(self, layer: int, index: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    # q-first, attention workers only (attention/lse_merge.py): decode rows over their cached
    # tokens, then the new tokens' k, v written and their terms merged in.
    def attend_cached(self, layer: int, index: Any, q: torch.Tensor) -> Any: ...

    def append_and_merge(self, layer: int, index: Any, partial: Any, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor) -> torch.Tensor: ...


class AttentionChannel(Protocol):
    def prepare(self, mb: MicroBatch) -> HostArrays: ...

    def begin(self, layer: int, context: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor): ...

    def finish(self, pending) -> torch.Tensor: ...


class LocalChannel:
    def __init__(self, attend: AttentionBackend):
        self.attend = attend

    def prepare(self, mb: MicroBatch) -> HostArrays:
        return self.attend.host_index(mb.chunks)

    def begin(self, layer, context, q, k, v):
        return self.attend(layer, context, q, k, v)

    def finish(self, pending):
        return pending
