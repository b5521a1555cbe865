"""Paged KV cache of one attention shard (DESIGN.md section 6).

Per layer, K and V are stored as `[num_blocks, kv_heads_local, block_size, head_dim]`
(heads outside tokens, FlashInfer's "HND"): the `block_size x head_dim` values of one head
in one block are contiguous, which is what decode attention streams.
With `kv_cache.dtype: fp8_e4m3` the blocks hold `torch.float8_e4m3fn` (half of bf16's bytes)
and the cache keeps a float32 scale per layer and KV head (`k_scale`, `v_scale`): a value x
is stored as x / scale, saturated to e4m3's +-448, and read back as stored * scale. The rank
that holds the cache quantizes here, on `write` (the transport carries the model's dtype);
readers dequantize: `read` for the torch reference, the Triton kernels in registers. The
scales are static tensors on the device (CUDA graphs read them by address) and are 1.0, as
vLLM's when a checkpoint carries none: e4m3 is a float format, so its relative precision is
the same at any scale and a scale only moves the range, which LLaMA-family k and v do not
leave (docs/BENCHMARKS.md, "FP8").
The driver's block manager owns the block tables; this class only writes new tokens into
the slots a block table names and reads a request's context back. Attention workers own one
of these for their KV-head group and request shard; in the colocated layout each model
worker owns one for its tensor-parallel heads.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from megatron_lamina.fp8 import FP8, FP8_MAX, FP8_NAME


def padded_block_tables(tables: list[list[int]], fill: int) -> np.ndarray:
    """[rows, longest table] int32, each row's table then `fill` (one numpy scatter, no loop
    over rows in Python beyond reading the lists)."""
    lengths = np.fromiter(map(len, tables), np.int64, len(tables))
    flat = np.fromiter(itertools.chain.from_iterable(tables), np.int32, int(lengths.sum()))
    out = np.full((len(tables), max(int(lengths.max(initial=0)), 1)), fill, dtype=np.int32)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[np.repeat(np.arange(len(tables)), lengths), np.arange(len(flat)) - starts] = flat
    return out


def slots_of(blocks: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """The flat cache slot of each position, given the block that holds it (its table's entry
    `position // block_size`): the one rule of where a token's k and v live."""
    return blocks.astype(np.int64) * block_size + positions % block_size


def chunk_slots(block_table, start: int, end: int, block_size: int) -> np.ndarray:
    """Flat cache slots of positions start..end-1 of a request with this block table (a list,
    or its row of a BlockTables array)."""
    positions = np.arange(start, end)
    return slots_of(np.asarray(block_table, dtype=np.int64)[positions // block_size], positions, block_size)


def storage_dtype(kv_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """What a cache stores for `kv_cache.dtype`: auto keeps the model's dtype."""
    return FP8 if kv_dtype == FP8_NAME else model_dtype


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [tokens, kv_heads, d] -> e4m3 of x / scale (scale [kv_heads]), saturated: a cast
    to e4m3 of a value past +-448 is NaN, never the largest value."""
    return (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x.float() * scale[:, None]).to(dtype)


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 storage: torch.dtype | None = None):
        """`dtype`: what `write` takes and `read` returns (the model's); `storage`: what the
        blocks hold (None: `dtype`; `FP8`: quantized with per-layer, per-head scales)."""
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype, self.storage = dtype, storage or dtype
        self.quantized = self.storage == FP8
        shape = (num_blocks, kv_heads, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=self.storage, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=self.storage, device=device) for _ in range(num_layers)]
        scales = (num_layers, kv_heads) if self.quantized else (num_layers, 0)
        self.k_scale = torch.ones(scales, dtype=torch.float32, device=device)
        self.v_scale = torch.ones(scales, dtype=torch.float32, device=device)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * dtype.itemsize

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [tokens, kv_heads, head_dim] stored at flat `slots` (`slots_of`)."""
        blocks, offsets = slots // self.block_size, slots % self.block_size
        if self.quantized:
            k, v = quantize(k, self.k_scale[layer]), quantize(v, self.v_scale[layer])
        self.k[layer][blocks, :, offsets] = k
        self.v[layer][blocks, :, offsets] = v

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[tokens, kv_heads, head_dim] of K and V at `slots`, in `dtype` (dequantized)."""
        blocks, offsets = slots // self.block_size, slots % self.block_size
        k, v = self.k[layer][blocks, :, offsets], self.v[layer][blocks, :, offsets]
        if self.quantized:
            return dequantize(k, self.k_scale[layer], self.dtype), dequantize(v, self.v_scale[layer], self.dtype)
        return k, v

    def as_stored(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v as `read` will give them back once written (q-first merges the new token's
        term from these, so that it equals attending the token from the cache)."""
        if not self.quantized:
            return k, v
        return (dequantize(quantize(k, self.k_scale[layer]), self.k_scale[layer], self.dtype),
                dequantize(quantize(v, self.v_scale[layer]), self.v_scale[layer], self.dtype))
