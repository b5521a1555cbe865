"""Stand-ins the benchmarks put where the engine has a real part, to time the rest alone.

`ZeroAttention` is an attention backend (the contract of attention/gpu.py's
`PagedAttention`) whose output is zeros at once: the model-worker step without attention.
It holds a throwaway cache only to lend CUDA graphs its block size and scratch block.
"""

from __future__ import annotations

import torch

from megatron_lamina.attention.kv_cache import PagedKVCache
from megatron_lamina.host_to_device import HostArrays


class ZeroAttention:
    def __init__(self, cache: PagedKVCache | None = None):
        self.cache = cache

    def host_index(self, chunks):
        return HostArrays({})

    def __call__(self, layer, index, q, k, v):
        return torch.zeros_like(q)
