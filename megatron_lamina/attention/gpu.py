"""Attention over the paged KV cache on a CUDA device: the Triton decode kernel for decode
tokens, SDPA over the gathered context for prefill chunks.

`PagedAttention` is what the attention workers (and colocated model workers) call per layer
on the GPU, with the same contract as `reference.attend_chunks`: append the chunk's k, v to
the cache, attend, return o. The per-micro-batch index tensors (cache slots of the new
tokens, the padded block table and context lengths of the decode rows) depend only on the
plan, so they are built once per micro-batch and reused by every layer: one index per
micro-batch is kept (keyed by the identity of its chunk list, which the step holds), since
the layers visit the micro-batches in rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_lamina.attention.kv_cache import PagedKVCache, padded_block_tables, slot_indices
from megatron_lamina.attention.triton_paged import paged_decode
from megatron_lamina.plan import SequenceChunk

MAX_MICRO_BATCHES_REMEMBERED = 16


@dataclass
class PagedBatchIndex:
    new_slots: torch.Tensor       # cache slots of every new token, in row order
    decode_rows: torch.Tensor     # rows that are single decode tokens
    block_tables: torch.Tensor    # [decode rows, max blocks] int32
    context_lens: torch.Tensor    # [decode rows] int32
    prefill: list[tuple[int, SequenceChunk, torch.Tensor]]  # (first row, chunk, context slots)
    max_context: int              # an upper bound of context_lens, known on the host (no sync)

    @classmethod
    def build(cls, chunks: list[SequenceChunk], block_size: int, device) -> "PagedBatchIndex":
        # Plain Python and one numpy table for the decode rows: a step of hundreds of decode
        # requests builds this on the host every step, so no tensor per chunk.
        slot_parts: list[torch.Tensor] = []
        decode_slots, decode_rows, tables, lens, prefill, row = [], [], [], [], [], 0
        for chunk in chunks:
            if len(chunk.tokens) == 1:
                p = chunk.start
                decode_slots.append(chunk.block_table[p // block_size] * block_size + p % block_size)
                decode_rows.append(row)
                tables.append(chunk.block_table)
                lens.append(chunk.end)
            else:
                if decode_slots:
                    slot_parts.append(torch.tensor(decode_slots, dtype=torch.long))
                    decode_slots = []
                slot_parts.append(slot_indices(chunk.block_table, chunk.start, chunk.end, block_size))
                context = slot_indices(chunk.block_table, 0, chunk.end, block_size).to(device)
                prefill.append((row, chunk, context))
            row += len(chunk.tokens)
        if decode_slots:
            slot_parts.append(torch.tensor(decode_slots, dtype=torch.long))
        table = padded_block_tables(tables, 0)
        return cls(torch.cat(slot_parts).to(device), torch.tensor(decode_rows, dtype=torch.long, device=device),
                   torch.from_numpy(table).to(device), torch.tensor(lens, dtype=torch.int32, device=device), prefill,
                   max(lens, default=1))


class PagedAttention:
    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        # id(chunk list) -> (the list, its index); holding the list keeps its id unique
        self._memo: dict[int, tuple[list[SequenceChunk], PagedBatchIndex]] = {}

    def index(self, chunks: list[SequenceChunk], device) -> PagedBatchIndex:
        entry = self._memo.get(id(chunks))
        if entry is None or entry[0] is not chunks:
            entry = (chunks, PagedBatchIndex.build(chunks, self.cache.block_size, device))
            self._remember(chunks, entry)
        return entry[1]

    def pin_index(self, chunks: list[SequenceChunk], index: PagedBatchIndex) -> None:
        """Use `index` for `chunks` (the static tensors of a CUDA graph)."""
        self._remember(chunks, (chunks, index))

    def _remember(self, chunks, entry) -> None:
        if len(self._memo) >= MAX_MICRO_BATCHES_REMEMBERED:  # a new step: the old lists are done
            self._memo.clear()
        self._memo[id(chunks)] = entry

    def __call__(self, layer: int, chunks: list[SequenceChunk], q, k, v) -> torch.Tensor:
        idx = self.index(chunks, q.device)
        self.cache.write(layer, idx.new_slots, k, v)
        out = torch.empty_like(q)
        if idx.decode_rows.numel():
            out[idx.decode_rows] = paged_decode(q[idx.decode_rows], self.cache.k[layer], self.cache.v[layer],
                                                idx.block_tables, idx.context_lens, max_context=idx.max_context)
        for row, chunk, context in idx.prefill:
            n = len(chunk.tokens)
            keys, values = self.cache.read(layer, context)           # [ctx, kv_heads, d]
            causal = torch.arange(chunk.end, device=q.device)[None, :] <= \
                torch.arange(chunk.start, chunk.end, device=q.device)[:, None]
            o = F.scaled_dot_product_attention(q[row:row + n].transpose(0, 1), keys.transpose(0, 1),
                                               values.transpose(0, 1), attn_mask=causal, enable_gqa=True)
            out[row:row + n] = o.transpose(0, 1)
        return out
