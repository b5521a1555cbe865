"""Attention over the paged KV cache on a CUDA device: the Triton decode kernel for decode
tokens, the Triton prefill kernel for prefill chunks (all chunks of a micro-batch in one
launch, reading the cache through the block tables).

`PagedAttention` is what the attention workers (and colocated model workers) call per layer
on the GPU, with the same contract as `reference.ReferenceAttention`: append the chunks' k,
v to the cache, attend, return o. The per-micro-batch index (cache slots of the new tokens,
the padded block tables and context lengths of the decode rows, the context slots of the
prefill chunks) depends only on the plan, so the worker builds it once per micro-batch and
step, on the host as numpy arrays (`host_index`), copies it to the device together with the
rest of the step's inputs (host_to_device.py), and passes it to every layer's call
explicitly. For q-first (lse_merge.py), `attend_cached` runs the decode kernel over each
decode row's context minus its new token and returns the log-sum-exp with the output;
`append_and_merge` then writes k, v and adds the new token's term.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from megatron_lamina.attention.kv_cache import PagedKVCache, padded_block_tables
from megatron_lamina.attention.lse_merge import CachedPartial, append_and_merge
from megatron_lamina.attention.triton_paged import paged_decode
from megatron_lamina.attention.triton_prefill import paged_prefill
from megatron_lamina.host_to_device import HostArrays
from megatron_lamina.plan import SequenceChunk


@dataclass
class PrefillChunks:
    """The prefill chunks of a micro-batch, as the prefill kernel reads them."""

    block_tables: torch.Tensor   # [chunks, max blocks]
    q_starts: torch.Tensor       # [chunks] first row of each chunk
    q_lens: torch.Tensor         # [chunks] its rows
    starts: torch.Tensor         # [chunks] the position of its first token
    max_q_len: int               # the longest chunk, known on the host


@dataclass
class PagedBatchIndex:
    new_slots: torch.Tensor           # cache slots of every new token, in row order
    decode_rows: torch.Tensor | None  # rows that are single decode tokens (None: every row, in order)
    block_tables: torch.Tensor        # [decode rows, max blocks] int64
    context_lens: torch.Tensor        # [decode rows] int64
    max_context: int                  # an upper bound of context_lens, known on the host (no sync)
    prefill: PrefillChunks | None

    @cached_property
    def cached_lens(self) -> torch.Tensor:
        """q-first: each decode row's context before its new token (once per step, not per layer)."""
        return self.context_lens - 1


def chunk_slots(block_table: list[int], start: int, end: int, block_size: int) -> np.ndarray:
    """Flat cache slots of positions start..end-1 of a request with this block table."""
    positions = np.arange(start, end)
    return np.asarray(block_table, dtype=np.int64)[positions // block_size] * block_size + positions % block_size


# Tiles of the prefill kernel for head_dim 128 on Hopper (128 query rows, 64 keys a tile).
PREFILL_CONFIG = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}


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
        if prefill:
            arrays.update(prefill_tables=padded_block_tables([c.block_table for _, c in prefill], 0),
                          q_starts=np.asarray([r for r, _ in prefill], np.int64),
                          q_lens=np.asarray([len(c.tokens) for _, c in prefill], np.int64),
                          starts=np.asarray([c.start for _, c in prefill], np.int64))
        max_context = max(lens, default=1)
        max_q_len = max((len(c.tokens) for _, c in prefill), default=0)

        def finish(t: dict[str, torch.Tensor]) -> PagedBatchIndex:
            chunks = PrefillChunks(t["prefill_tables"], t["q_starts"], t["q_lens"], t["starts"], max_q_len) \
                if prefill else None
            return PagedBatchIndex(t["new_slots"], None if every_row else t["decode_rows"], t["tables"], t["lens"],
                                   max_context, chunks)

        return HostArrays(arrays, finish)

    def __call__(self, layer: int, index: PagedBatchIndex, q, k, v) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        self.cache.write(layer, index.new_slots, k, v)
        if index.prefill is None and index.decode_rows is None:  # a decode-only micro-batch
            return paged_decode(q, k_cache, v_cache, index.block_tables, index.context_lens,
                                max_context=index.max_context)
        out = torch.empty_like(q)
        if index.block_tables.shape[0]:
            rows = index.decode_rows
            out[rows] = paged_decode(q[rows], k_cache, v_cache, index.block_tables, index.context_lens,
                                     max_context=index.max_context)
        if index.prefill is not None:
            p = index.prefill
            paged_prefill(q, k_cache, v_cache, p.block_tables, p.q_starts, p.q_lens, p.starts, out, p.max_q_len,
                          **PREFILL_CONFIG)
        return out

    def attend_cached(self, layer: int, index: PagedBatchIndex, q) -> CachedPartial:
        """q-first, a decode-only micro-batch: the decode kernel over context_lens - 1 keys."""
        assert index.prefill is None and index.decode_rows is None, "attend_cached takes decode rows only"
        out, lse = paged_decode(q, self.cache.k[layer], self.cache.v[layer], index.block_tables,
                                index.cached_lens, max_context=index.max_context, return_lse=True)
        return CachedPartial(out, lse)

    def append_and_merge(self, layer: int, index: PagedBatchIndex, partial: CachedPartial, q, k, v) -> torch.Tensor:
        return append_and_merge(self.cache, layer, index.new_slots, partial, q, k, v)
