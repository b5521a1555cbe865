"""Attention over the paged KV cache on a CUDA device: the Triton decode kernel for decode
tokens, SDPA over the gathered context for prefill chunks.

`PagedAttention` is what the attention workers (and colocated model workers) call per layer
on the GPU, with the same contract as `reference.ReferenceAttention`: append the chunks' k,
v to the cache, attend, return o. The per-micro-batch index (cache slots of the new tokens,
the padded block tables and context lengths of the decode rows, the context slots of the
prefill chunks) depends only on the plan, so the worker builds it once per micro-batch and
step, on the host as numpy arrays (`host_index`), copies it to the device together with the
rest of the step's inputs (host_to_device.py), and passes it to every layer's call
explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from megatron_lamina.attention.kv_cache import PagedKVCache, padded_block_tables
from megatron_lamina.attention.triton_paged import paged_decode
from megatron_lamina.host_to_device import HostArrays
from megatron_lamina.plan import SequenceChunk


@dataclass
class PrefillChunk:
    row: int                 # first row of the chunk in the micro-batch
    start: int               # position of its first token
    end: int                 # context length after it
    context: torch.Tensor    # cache slots of positions 0 .. end-1


@dataclass
class PagedBatchIndex:
    new_slots: torch.Tensor           # cache slots of every new token, in row order
    decode_rows: torch.Tensor | None  # rows that are single decode tokens (None: every row, in order)
    block_tables: torch.Tensor        # [decode rows, max blocks] int64
    context_lens: torch.Tensor        # [decode rows] int64
    max_context: int                  # an upper bound of context_lens, known on the host (no sync)
    prefill: list[PrefillChunk]


def chunk_slots(block_table: list[int], start: int, end: int, block_size: int) -> np.ndarray:
    """Flat cache slots of positions start..end-1 of a request with this block table."""
    positions = np.arange(start, end)
    return np.asarray(block_table, dtype=np.int64)[positions // block_size] * block_size + positions % block_size


class PagedAttention:
    def __init__(self, cache: PagedKVCache):
        self.cache = cache

    def host_index(self, chunks: list[SequenceChunk]) -> HostArrays:
        """The index of a micro-batch's chunks as host arrays (plain Python and numpy: a
        step of hundreds of decode requests builds this every step, so no tensor per chunk)."""
        bs = self.cache.block_size
        slots, decode_rows, tables, lens, prefill, row = [], [], [], [], [], 0
        for chunk in chunks:
            if len(chunk.tokens) == 1:
                p = chunk.start
                slots.append(np.array([chunk.block_table[p // bs] * bs + p % bs]))
                decode_rows.append(row)
                tables.append(chunk.block_table)
                lens.append(chunk.end)
            else:
                slots.append(chunk_slots(chunk.block_table, chunk.start, chunk.end, bs))
                prefill.append((row, chunk))
            row += len(chunk.tokens)
        arrays = {"new_slots": np.concatenate(slots) if slots else np.zeros(0, np.int64),
                  "tables": padded_block_tables(tables, 0), "lens": np.asarray(lens, np.int64)}
        every_row = len(decode_rows) == row
        if not every_row:
            arrays["decode_rows"] = np.asarray(decode_rows, np.int64)
        for i, (_, chunk) in enumerate(prefill):
            arrays[f"context{i}"] = chunk_slots(chunk.block_table, 0, chunk.end, bs)
        max_context = max(lens, default=1)

        def finish(t: dict[str, torch.Tensor]) -> PagedBatchIndex:
            return PagedBatchIndex(
                t["new_slots"], None if every_row else t["decode_rows"], t["tables"], t["lens"], max_context,
                [PrefillChunk(r, c.start, c.end, t[f"context{i}"]) for i, (r, c) in enumerate(prefill)])

        return HostArrays(arrays, finish)

    def __call__(self, layer: int, index: PagedBatchIndex, q, k, v) -> torch.Tensor:
        self.cache.write(layer, index.new_slots, k, v)
        if not index.prefill and index.decode_rows is None:  # a decode-only micro-batch
            return paged_decode(q, self.cache.k[layer], self.cache.v[layer], index.block_tables,
                                index.context_lens, max_context=index.max_context)
        out = torch.empty_like(q)
        if index.block_tables.shape[0]:
            rows = index.decode_rows
            out[rows] = paged_decode(q[rows], self.cache.k[layer], self.cache.v[layer], index.block_tables,
                                     index.context_lens, max_context=index.max_context)
        for chunk in index.prefill:
            n = chunk.end - chunk.start
            keys, values = self.cache.read(layer, chunk.context)           # [ctx, kv_heads, d]
            causal = torch.arange(chunk.end, device=q.device)[None, :] <= \
                torch.arange(chunk.start, chunk.end, device=q.device)[:, None]
            o = F.scaled_dot_product_attention(q[chunk.row:chunk.row + n].transpose(0, 1), keys.transpose(0, 1),
                                               values.transpose(0, 1), attn_mask=causal, enable_gqa=True)
            out[chunk.row:chunk.row + n] = o.transpose(0, 1)
        return out

