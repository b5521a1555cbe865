"""The prefix cache's host-tier memory (worker/host_tier.py is the one caller): a zeroed host
buffer of exactly the size asked, pinned when its copies go to and from a GPU.

Why not `torch.empty(..., pin_memory=True)`: PyTorch's pinned tensors come from its
CachingHostAllocator (aten/src/ATen/core/CachingHostAllocator.h, `allocate`), which rounds
every request up to the next power of two (`c10::llvm::PowerOf2Ceil`) before it calls
cudaHostAlloc, so that a freed block can serve any later request of its size class. Newer
versions skip the rounding only above `pinned_max_round_threshold`, which has no limit unless
set. A 40 GiB tier would lock 64 GiB of pages, and one of 65 GiB would need 128. Here the
buffer comes from the ordinary CPU allocator (pageable, no size classes) and CUDA registers
its own byte range (`cudaHostRegister`, flags 0: on a 64-bit system with unified addressing
that is mapped and portable), which locks exactly those pages. The caching allocator never
sees it, so `torch.cuda.host_memory_stats()` does not count it; for the copy engine it is
pinned memory like any other: a `non_blocking` copy to or from it is one asynchronous
transfer on the current stream, and `is_pinned()` is true.

What the caching allocator would do and this does not: keep a block until the copies
recorded on it are done. The buffer lives as long as its tier; `release` waits for the
stream that copies to and from it, then unregisters it, before its bytes can be freed.
Registering locks every page, so a size the host cannot hold fails there: it is checked first
against the host's available memory (a page locked past it could bring the kernel's
out-of-memory killer instead of an error), then by CUDA's return code; either is an error
naming kv_cache.host_cache_gib.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

GIB = 1 << 30


def host_buffer(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Zeroed uint8 host memory of `shape` for copies to and from `device`: pinned exactly
    (`pin`) when it is a GPU, plain pageable memory otherwise."""
    nbytes = math.prod(shape)
    assert nbytes > 0, shape
    available = available_host_bytes()
    if available is not None and nbytes > available:
        raise RuntimeError(
            f"kv_cache.host_cache_gib: the prefix cache's host tier needs {nbytes / GIB:.2f} GiB of host memory "
            f"on this rank, but this host has {available / GIB:.2f} GiB available (MemAvailable, /proc/meminfo); "
            "lower kv_cache.host_cache_gib (it is per rank that holds KV: each such rank on this host has its own)")
    buffer = torch.zeros(shape, dtype=torch.uint8)
    if device.type == "cuda":
        pin(buffer, device)
    return buffer


def pin(buffer: torch.Tensor, device: torch.device) -> None:
    """Register `buffer`'s bytes with CUDA (page-locked, exactly its size)."""
    cudart = torch.cuda.cudart()
    with torch.cuda.device(device):
        error = cudart.cudaHostRegister(buffer.data_ptr(), buffer.nbytes, 0)
    if error != cudart.cudaError.success:
        raise RuntimeError(
            f"kv_cache.host_cache_gib: could not pin the prefix cache's host tier, {buffer.nbytes / GIB:.2f} GiB of "
            f"host memory for {device} (cudaHostRegister: {cudart.cudaGetErrorString(error)}, error {int(error)}); "
            "lower kv_cache.host_cache_gib (it is per rank that holds KV), or give the process more lockable memory")


def release(buffer: torch.Tensor, device: torch.device, copies: torch.cuda.Stream | None) -> None:
    """Undo `pin`, once `copies` (the only stream that reads or writes `buffer`) is done with it;
    nothing to do for pageable memory."""
    if device.type != "cuda":
        return
    copies.synchronize()
    cudart = torch.cuda.cudart()
    with torch.cuda.device(device):
        error = cudart.cudaHostUnregister(buffer.data_ptr())
    assert error == cudart.cudaError.success, cudart.cudaGetErrorString(error)


def available_host_bytes() -> int | None:
    """The kernel's estimate of the memory new allocations can take without swapping
    (MemAvailable: free memory plus what it can reclaim); None where /proc/meminfo has none."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            return int(value.split()[0]) * 1024  # in kB
    return None
