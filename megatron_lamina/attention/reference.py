"""Torch reference attention over the paged KV cache: decode tokens and causal prefill chunks.

For each request of a micro-batch: append its new k, v to the cache, read its whole context
back through the block table and attend with a causal mask by position (query at position p
sees keys 0..p). GQA by repeating KV heads. Softmax in float32. Slow and plain on purpose:
it is the CPU path and the reference the GPU kernels are tested against.
"""

from __future__ import annotations

import math

import torch

from megatron_lamina.attention.kv_cache import PagedKVCache, slot_indices
from megatron_lamina.plan import SequenceChunk


def attend_chunks(cache: PagedKVCache, layer: int, chunks: list[SequenceChunk],
                  q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [tokens, heads, d], k/v [tokens, kv_heads, d] (rows in chunk order) -> o like q."""
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[1] // k.shape[1]
    row = 0
    for chunk in chunks:
        n = len(chunk.tokens)
        rows = slice(row, row + n)
        cache.write(layer, slot_indices(chunk.block_table, chunk.start, chunk.end, cache.block_size),
                    k[rows], v[rows])
        keys, values = cache.read(layer, slot_indices(chunk.block_table, 0, chunk.end, cache.block_size))
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1).float()      # [h, ctx, d]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1).float()
        scores = torch.matmul(q[rows].transpose(0, 1).float(), keys.transpose(1, 2)) * scale
        q_pos = torch.arange(chunk.start, chunk.end)[:, None]
        causal = torch.arange(chunk.end)[None, :] <= q_pos                      # [n, ctx]
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[rows] = torch.matmul(probs, values).transpose(0, 1).to(q.dtype)
        row += n
    return out
