"""Paged KV cache of one attention shard (DESIGN.md section 6).

Per layer, K and V are stored as `[num_blocks, kv_heads_local, block_size, head_dim]`
(heads outside tokens, FlashInfer's "HND"): the `block_size x head_dim` values of one head
in one block are contiguous, which is what decode attention streams.
The driver's block manager owns the block tables; this class only writes new tokens into
the slots a block table names and reads a request's context back. Attention workers own one
of these for their KV-head group and request shard; in the colocated layout each model
worker owns one for its tensor-parallel heads.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch


def padded_block_tables(tables: list[list[int]], fill: int) -> np.ndarray:
    """[rows, longest table] int32, each row's table then `fill` (one numpy scatter, no loop
    over rows in Python beyond reading the lists)."""
    lengths = np.fromiter(map(len, tables), np.int64, len(tables))
    flat = np.fromiter(itertools.chain.from_iterable(tables), np.int32, int(lengths.sum()))
    out = np.full((len(tables), max(int(lengths.max(initial=0)), 1)), fill, dtype=np.int32)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[np.repeat(np.arange(len(tables)), lengths), np.arange(len(flat)) - starts] = flat
    return out


def slot_indices(block_table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of positions start..end-1 of a request with this block table."""
    positions = torch.arange(start, end)
    blocks = torch.tensor(block_table, dtype=torch.long)[positions // block_size]
    return blocks * block_size + positions % block_size


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, kv_heads, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * dtype.itemsize

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [tokens, kv_heads, head_dim] stored at flat `slots` (block * block_size + offset)."""
        blocks, offsets = slots // self.block_size, slots % self.block_size
        self.k[layer][blocks, :, offsets] = k
        self.v[layer][blocks, :, offsets] = v

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[tokens, kv_heads, head_dim] of K and V at `slots`."""
        blocks, offsets = slots // self.block_size, slots % self.block_size
        return self.k[layer][blocks, :, offsets], self.v[layer][blocks, :, offsets]
