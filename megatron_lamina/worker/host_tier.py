"""The prefix cache's host tier on a rank that holds KV (an attention worker, or a colocated
model worker): a copy of its cache's blocks in (pinned) host memory.

The driver's block manager decides every copy (driver/block_manager.py): a cached block
evicted from the device is copied to a host slot (an offload), a prefix found only on the
host is copied back into fresh device blocks (a load). The plan carries them as (shard,
device block, host slot) triples (`StepPlan.offloads`, `loads`), and the holder issues this
rank's shard's copies first thing in the step (`apply`).

The copy engine, not the step, pays for them. On CUDA the transfers run on the rank's own
copy stream, from and to pinned memory, and the host never waits for either stream:
  * an offload's blocks are gathered into a staging buffer on the step's (compute) stream,
    so the gather follows every earlier write to them and precedes every later one (the block
    may be refilled this very step); the slow device-to-host transfer then runs from the
    staging buffer on the copy stream, which waits for the gather (an event), and the step
    never waits for it;
  * a load's host-to-device transfer starts at once on the copy stream (an earlier offload
    to the same slot is ahead of it on that stream; the block manager never offloads to a
    slot that a load of the same step reads), then, once the compute stream has reached this
    step (the event after the gathers: a block an offload reads may be the one a load fills),
    it is scattered into the blocks on the copy stream, and the compute stream waits for that
    event only, on the GPU, before the step's first kernel.
A host slot holds every layer's K and V of one block side by side (slot-major), so a run of
consecutive slots is one contiguous transfer each way. On a CPU the same calls run in the
same order, with no streams or events. The host tensors hold the cache's bytes as they are
stored (FP8 included).

The slots are whole blocks, and on CUDA exactly their bytes are pinned (host_memory.py: not
PyTorch's pinned allocator, which rounds a size up to a power of two); the start-up line
(`sizing_line`) states those blocks and bytes. `close` unpins them once their copies are done
(the tier's collection does too).
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext

import numpy as np
import torch

from megatron_lamina.attention.kv_cache import PagedKVCache
from megatron_lamina.config import ConfigError
from megatron_lamina.host_to_device import HostArrays, to_device
from megatron_lamina.plan import StepPlan
from megatron_lamina.worker.host_memory import GIB, host_buffer, release


def host_blocks(gib: float, bytes_per_block: int) -> int:
    """The host tier's slots per cache-holding rank for `kv_cache.host_cache_gib`: the whole
    blocks that fit (a tier asked for that holds none is a mistake, not no tier)."""
    slots = int(gib * GIB) // bytes_per_block
    if gib > 0 and slots == 0:
        raise ConfigError(f"kv_cache.host_cache_gib = {gib:g} holds no whole KV block ({bytes_per_block:,} bytes "
                          f"on this rank); set at least {bytes_per_block / GIB:.3g}, or 0 for no host tier")
    return slots


def sizing_line(slots: int, block_size: int, nbytes: int, pinned: bool, holder: str) -> str:
    """The start-up line that sizes a tier: its blocks and their bytes, which is what it pins."""
    return (f"prefix cache host tier: {slots} blocks of {block_size} tokens ({slots * block_size:,} tokens), "
            f"{nbytes / GIB:.2f} GiB of {'pinned ' if pinned else ''}host memory {holder}")


def slot_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive values in sorted `slots`: (first index, end index, first slot)."""
    runs, start = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((start, i, slots[start]))
            start = i
    return runs


class HostTier:
    def __init__(self, cache: PagedKVCache, num_slots: int, shard: int):
        """`shard`: the request shard whose copies this rank runs (colocated: 0)."""
        self.shard = shard
        self.device = cache.k[0].device
        # Every layer's K then V, as [blocks, bytes of one block]: views of the cache itself.
        self.layers = [t.view(torch.uint8).view(t.shape[0], -1) for t in cache.k + cache.v]
        cuda = self.device.type == "cuda"
        self.copies = torch.cuda.Stream(self.device) if cuda else None  # this rank's copy stream
        self.slots = host_buffer((num_slots, len(self.layers), self.layers[0].shape[1]), self.device)
        self.pinned_bytes = self.slots.nbytes if cuda else 0
        # Unpinned by `close` or when the tier is collected; at interpreter exit the process's
        # end frees the pages, and CUDA may be torn down already.
        self._release = weakref.finalize(self, release, self.slots, self.device, self.copies)
        self._release.atexit = False

    @property
    def nbytes(self) -> int:
        return self.slots.nbytes

    def close(self) -> None:
        """Unpin the slots once their copies are done; the tier copies nothing after this."""
        self._release()

    def apply(self, plan: StepPlan) -> None:
        """Issue this step's copies (module docstring); returns without waiting for them."""
        offloads, loads = self._mine(plan.offloads), self._mine(plan.loads)
        if not offloads[0] and not loads[0]:
            return
        compute = torch.cuda.current_stream(self.device) if self.copies is not None else None
        [index] = to_device([HostArrays({"offload": np.array(offloads[0], np.int64),
                                         "load": np.array(loads[0], np.int64)})], self.device)
        offload_blocks, load_blocks = index["offload"], index["load"]
        outgoing = self._gather(offload_blocks) if offloads[0] else None
        gathered = compute.record_event() if compute is not None else None
        with torch.cuda.stream(self.copies) if self.copies is not None else nullcontext():
            incoming = self._fetch(loads[1]) if loads[0] else None
            if gathered is not None:
                self.copies.wait_event(gathered)
            if incoming is not None:
                for i, layer in enumerate(self.layers):
                    layer[load_blocks] = incoming[:, i]
            loaded = self.copies.record_event() if self.copies is not None else None
            if outgoing is not None:
                self._store(outgoing, offloads[1])
        if compute is not None:
            for t in (offload_blocks, load_blocks) + ((outgoing,) if outgoing is not None else ()):
                t.record_stream(self.copies)  # made on the compute stream, read on the copy stream
            compute.wait_event(loaded)  # the step reads the loaded blocks; it never waits for an offload

    def _gather(self, blocks: torch.Tensor) -> torch.Tensor:
        """The blocks' bytes, [blocks, layers, bytes], on the current stream."""
        out = torch.empty((len(blocks), *self.slots.shape[1:]), dtype=torch.uint8, device=self.device)
        for i, layer in enumerate(self.layers):
            out[:, i] = layer.index_select(0, blocks)
        return out

    def _fetch(self, slots: list[int]) -> torch.Tensor:
        """The slots' bytes, copied to the device in one transfer per run of consecutive slots."""
        out = torch.empty((len(slots), *self.slots.shape[1:]), dtype=torch.uint8, device=self.device)
        for start, end, slot in slot_runs(slots):
            out[start:end].copy_(self.slots[slot:slot + end - start], non_blocking=True)
        return out

    def _store(self, staged: torch.Tensor, slots: list[int]) -> None:
        """`staged` rows into the slots, one transfer per run of consecutive slots."""
        for start, end, slot in slot_runs(slots):
            self.slots[slot:slot + end - start].copy_(staged[start:end], non_blocking=True)

    def _mine(self, triples: list[int]) -> tuple[list[int], list[int]]:
        """This rank's shard's (device blocks, host slots), ordered by slot (runs stay runs)."""
        pairs = sorted((triples[i + 2], triples[i + 1]) for i in range(0, len(triples), 3)
                       if triples[i] == self.shard)
        return [block for _, block in pairs], [slot for slot, _ in pairs]
