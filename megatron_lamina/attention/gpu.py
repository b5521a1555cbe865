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

from megatron_lamina.attention.kv_cache import PagedKVCache, chunk_slots, slots_of
from megatron_lamina.attention.lse_merge import CachedPartial, append_and_merge
from megatron_lamina.attention.triton_paged import paged_decode
from megatron_lamina.attention.triton_prefill import paged_prefill
from megatron_lamina.worker.block_tables import ChunkTables
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


# Tiles of the prefill kernel for head_dim 128 on Hopper (128 query rows, 64 keys a tile).
PREFILL_CONFIG = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}


class PagedAttention:
    def __init__(self, cache: PagedKVCache):
        self.cache = cache

    def host_index(self, chunks: list[SequenceChunk]) -> HostArrays:
        """The index of a micro-batch's chunks as host arrays. A step of hundreds of decode
        requests builds this every step, so nothing here grows with the context: the decode
        rows' tables are gathered on the device from this rank's block-table mirror
        (worker/block_tables.py), and their slots are one numpy expression."""
        bs = self.cache.block_size
        lengths = np.fromiter((len(c.tokens) for c in chunks), np.int64, len(chunks))
        first_rows = np.cumsum(lengths) - lengths
        is_decode = lengths == 1
        decode = [c for c, one in zip(chunks, is_decode) if one]
        prefill = [(int(r), c) for r, c, one in zip(first_rows, chunks, is_decode) if not one]
        tables = ChunkTables.of(decode)
        positions = np.fromiter((c.start for c in decode), np.int64, len(decode))
        decode_slots = slots_of(tables.blocks_at(positions // bs), positions, bs)
        lens = positions + 1
        total = int(lengths.sum())
        every_row = len(decode) == total
        decode_rows = first_rows[is_decode]
        if every_row:
            new_slots = decode_slots
        else:
            new_slots = np.empty(total, np.int64)
            new_slots[decode_rows] = decode_slots
            for row, c in prefill:
                new_slots[row:row + len(c.tokens)] = chunk_slots(c.block_table, c.start, c.end, bs)
        arrays = {"new_slots": new_slots, **tables.host_arrays("tables"), "lens": lens}
        if not every_row:
            arrays["decode_rows"] = decode_rows
        prefill_tables = ChunkTables.of([c for _, c in prefill])
        if prefill:
            arrays.update(prefill_tables.host_arrays("prefill_tables"),
                          q_starts=np.asarray([r for r, _ in prefill], np.int64),
                          q_lens=np.asarray([len(c.tokens) for _, c in prefill], np.int64),
                          starts=np.asarray([c.start for _, c in prefill], np.int64))
        max_context = int(lens.max(initial=1))
        max_q_len = max((len(c.tokens) for _, c in prefill), default=0)

        def finish(t: dict[str, torch.Tensor]) -> PagedBatchIndex:
            chunks = PrefillChunks(prefill_tables.on_device(t, "prefill_tables"), t["q_starts"], t["q_lens"],
                                   t["starts"], max_q_len) if prefill else None
            return PagedBatchIndex(t["new_slots"], None if every_row else t["decode_rows"],
                                   tables.on_device(t, "tables"), t["lens"], max_context, chunks)

        return HostArrays(arrays, finish)

    def __call__(self, layer: int, index: PagedBatchIndex, q, k, v) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        scales = self._scales(layer)
        self.cache.write(layer, index.new_slots, k, v)
        if index.prefill is None and index.decode_rows is None:  # a decode-only micro-batch
            return paged_decode(q, k_cache, v_cache, index.block_tables, index.context_lens,
                                max_context=index.max_context, **scales)
        out = torch.empty_like(q)
        if index.block_tables.shape[0]:
            rows = index.decode_rows
            out[rows] = paged_decode(q[rows], k_cache, v_cache, index.block_tables, index.context_lens,
                                     max_context=index.max_context, **scales)
        if index.prefill is not None:
            p = index.prefill
            paged_prefill(q, k_cache, v_cache, p.block_tables, p.q_starts, p.q_lens, p.starts, out, p.max_q_len,
                          **PREFILL_CONFIG, **scales)
        return out

    def _scales(self, layer: int) -> dict[str, torch.Tensor]:
        """An FP8 cache's scales of this layer, as the kernels take them (none otherwise)."""
        if not self.cache.quantized:
            return {}
        return {"k_scale": self.cache.k_scale[layer], "v_scale": self.cache.v_scale[layer]}

    def attend_cached(self, layer: int, index: PagedBatchIndex, q) -> CachedPartial:
        """q-first, a decode-only micro-batch: the decode kernel over context_lens - 1 keys."""
        assert index.prefill is None and index.decode_rows is None, "attend_cached takes decode rows only"
        out, lse = paged_decode(q, self.cache.k[layer], self.cache.v[layer], index.block_tables,
                                index.cached_lens, max_context=index.max_context, return_lse=True,
                                **self._scales(layer))
        return CachedPartial(out, lse)

    def append_and_merge(self, layer: int, index: PagedBatchIndex, partial: CachedPartial, q, k, v) -> torch.Tensor:
        return append_and_merge(self.cache, layer, index.new_slots, partial, q, k, v)
