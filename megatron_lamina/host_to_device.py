"""One host-to-device copy per step: the step's index arrays packed into one pinned buffer.

A step's inputs (token ids, positions, the rows to sample, the cache slots and block tables
of the attention index...) are built on the host as numpy arrays by whoever needs them
(worker/step_inputs.py, attention/gpu.py). `HostArrays` is such a set of arrays with the
function that turns their device copies into the object the step uses; `to_device` packs
every set of a step into one pinned int64 buffer, copies it with one asynchronous transfer
and hands each set its views. Pinned memory matters twice: the copy does not wait for the
GPU to drain (a pageable copy synchronizes the stream first), and the buffer is not
reused until the copy has run (PyTorch's caching host allocator records the copy's stream).
This is a leaf module: the engine, the model workers and the attention workers use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch


@dataclass
class HostArrays:
    arrays: dict[str, np.ndarray]
    finish: Callable[[dict[str, torch.Tensor]], Any] = field(default=lambda tensors: tensors)


def to_device(sets: list[HostArrays], device: torch.device) -> list[Any]:
    """Copy every array of every set to `device` at once (int64; shapes kept) and return
    each set's `finish(views)`, in order."""
    flat = [np.ascontiguousarray(a, dtype=np.int64).reshape(-1) for s in sets for a in s.arrays.values()]
    total = sum(a.size for a in flat)
    if device.type == "cuda":
        host = torch.empty(total, dtype=torch.int64, pin_memory=True)
        if total:
            np.concatenate(flat, out=host.numpy())
        buffer = host.to(device, non_blocking=True)
    else:
        buffer = torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0, np.int64))
    out, offset = [], 0
    for s in sets:
        views = {}
        for name, array in s.arrays.items():
            views[name] = buffer[offset:offset + array.size].view(array.shape)
            offset += array.size
        out.append(s.finish(views))
    return out
