"""The prefix cache's host tier on a rank that holds KV (an attention worker, or a colocated
model worker): a copy of its cache's layout in (pinned) host memory.

The driver's block manager decides every copy (block_manager.py): a cached block evicted from
the device is copied to a host slot (an offload), a prefix found only on the host is copied
back into fresh device blocks (a load). The plan carries them as (shard, device block, host
slot) triples (`StepPlan.offloads`, `loads`), and the holder runs this rank's shard's copies
first thing in the step, offloads then loads, on the stream the step's attention then runs
on, so the step reads what the loads wrote and nothing writes a block before it was copied
out. Every layer's K and V go in one indexed copy per direction. The host tensors hold the
cache's bytes as they are stored (FP8 included), viewed as bytes.
"""

from __future__ import annotations

import torch

from megatron_lamina.attention.kv_cache import PagedKVCache
from megatron_lamina.plan import StepPlan


def host_blocks(gib: float, bytes_per_block: int) -> int:
    """The host tier's slots per cache-holding rank for `kv_cache.host_cache_gib`."""
    return int(gib * (1 << 30)) // bytes_per_block


class HostTier:
    def __init__(self, cache: PagedKVCache, num_slots: int, shard: int):
        """`shard`: the request shard whose copies this rank runs (colocated: 0)."""
        self.cache, self.shard = cache, shard
        pin = cache.k[0].is_cuda
        shape = (num_slots, *cache.k[0].view(torch.uint8).shape[1:])
        self.k = [torch.zeros(shape, dtype=torch.uint8, pin_memory=pin) for _ in cache.k]
        self.v = [torch.zeros(shape, dtype=torch.uint8, pin_memory=pin) for _ in cache.v]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self.k + self.v)

    def apply(self, plan: StepPlan) -> None:
        offloads, loads = self._mine(plan.offloads), self._mine(plan.loads)
        if offloads is not None:
            blocks, slots = offloads
            device_blocks = blocks.to(self.cache.k[0].device)
            for host, device in zip(self.k + self.v, self.cache.k + self.cache.v):
                host[slots] = device.view(torch.uint8)[device_blocks].cpu()
        if loads is not None:
            blocks, slots = loads
            device_blocks = blocks.to(self.cache.k[0].device)
            for host, device in zip(self.k + self.v, self.cache.k + self.cache.v):
                device.view(torch.uint8)[device_blocks] = host[slots].to(device.device, non_blocking=True)

    def _mine(self, triples: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not triples:
            return None
        rows = torch.tensor(triples, dtype=torch.long).view(-1, 3)
        rows = rows[rows[:, 0] == self.shard]
        return (rows[:, 1], rows[:, 2]) if len(rows) else None
