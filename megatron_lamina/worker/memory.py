"""How many KV blocks a rank's cache gets (`kv_cache.num_blocks: auto`; DESIGN.md section 6).

`kv_cache.memory_fraction` is the share of the whole device this process may use, as vLLM's
`gpu_memory_utilization`. The cache is sized last: after the weights are on the device, the
stage graphs are captured, the decode graphs' memory is learnt from a capture on a tiny cache
(their pool keeps it reserved for the real capture), and the largest step the scheduler can
plan has run once eagerly with the sampler, to measure the activations that live outside the
graphs. So

    KV bytes = fraction x device total - (device total - free now) - eager activation peak

and the cache is what that holds, the same on every rank (the smallest count wins). Ranks that
share one GPU (more ranks than GPUs on the host) split the fraction evenly; then what others
hold on the device cannot be told from this process's own, so each rank counts only its own
allocator's memory and `CONTEXT_BYTES` for its CUDA context. On a CPU the "device" is this
process's share of the available host memory.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def free_and_total(device: torch.device) -> tuple[int, int]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.mem_get_info(device)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // sharing
    return available, available


@contextmanager
def measure_peak(device: torch.device):
    """Yields a list that receives the peak of memory allocated inside the block, above what
    was allocated when it began (CUDA; 0 on a CPU)."""
    result = [0]
    if device.type != "cuda":
        yield result
        return
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield result
    torch.cuda.synchronize(device)
    result[0] = max(0, torch.cuda.max_memory_allocated(device) - base)


CONTEXT_BYTES = 1 << 30  # a CUDA context, cuBLAS and NCCL buffers: what the allocator does not see


def ranks_per_device(device: torch.device) -> int:
    """Ranks of this host on the same GPU as this one (LOCAL_RANK modulo the GPU count)."""
    if device.type != "cuda":
        return 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count()
    return sum(1 for r in range(local) if r % gpus == device.index)


def kv_blocks_that_fit(device: torch.device, memory_fraction: float, bytes_per_block: int,
                       activation_peak: int) -> tuple[int, str]:
    """Blocks of `bytes_per_block` this rank can still allocate, and a line saying why."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the profile's cached blocks go back: `free` counts what is held
    free, total = free_and_total(device)
    sharing = ranks_per_device(device)
    gib = 1 << 30
    if sharing > 1:
        used = torch.cuda.memory_reserved(device) + CONTEXT_BYTES
        budget = int(memory_fraction * total / sharing) - used - activation_peak
        why = (f"{memory_fraction:g} x {total / gib:.1f} GiB / {sharing} ranks on this GPU - {used / gib:.1f} GiB "
               f"of this rank - {activation_peak / gib:.2f} GiB eager activations = {max(budget, 0) / gib:.1f} GiB")
    else:
        budget = int(memory_fraction * total) - (total - free) - activation_peak
        why = (f"{memory_fraction:g} x {total / gib:.1f} GiB - {(total - free) / gib:.1f} GiB in use "
               f"- {activation_peak / gib:.2f} GiB eager activations = {max(budget, 0) / gib:.1f} GiB")
    return max(0, min(budget, free - activation_peak) // bytes_per_block), why
