"""Torch reference attention over the paged KV cache: decode tokens and causal prefill chunks.

For each request of a micro-batch: append its new k, v to the cache, read its whole context
back through the block table and attend with a causal mask by position (query at position p
sees keys 0..p). GQA by repeating KV heads. Softmax in float32. Slow and plain on purpose:
it is the CPU path and the reference the GPU kernels are tested against.
`ReferenceAttention` gives it the interface the workers call (`host_index` once per
micro-batch and step, then a call per layer), like `gpu.PagedAttention`; for q-first
(lse_merge.py) also `attend_cached` (decode rows over their cached tokens, with the
log-sum-exp) and `append_and_merge`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_lamina.attention.kv_cache import PagedKVCache, chunk_slots
from megatron_lamina.attention.lse_merge import CachedPartial, append_and_merge
from megatron_lamina.host_to_device import HostArrays
from megatron_lamina.plan import SequenceChunk


def attend_chunks(cache: PagedKVCache, layer: int, chunks: list[SequenceChunk],
                  q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [tokens, heads, d], k/v [tokens, kv_heads, d] (rows in chunk order) -> o like q."""
    spans = []
    for c in chunks:
        context = torch.from_numpy(chunk_slots(c.block_table, 0, c.end, cache.block_size))
        spans.append((c.start, c.end, context[c.start:], context))
    return _attend(cache, layer, spans, q, k, v)


def _attend(cache: PagedKVCache, layer: int, spans, q, k, v) -> torch.Tensor:
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[1] // k.shape[1]
    row = 0
    for start, end, new_slots, context in spans:
        rows = slice(row, row + end - start)
        cache.write(layer, new_slots, k[rows], v[rows])
        keys, values = cache.read(layer, context)
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1).float()      # [h, ctx, d]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1).float()
        scores = torch.matmul(q[rows].transpose(0, 1).float(), keys.transpose(1, 2)) * scale
        q_pos = torch.arange(start, end)[:, None]
        causal = torch.arange(end)[None, :] <= q_pos                              # [n, ctx]
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[rows] = torch.matmul(probs, values).transpose(0, 1).to(q.dtype)
        row += end - start
    return out


@dataclass
class ReferenceIndex:
    spans: list[tuple[int, int, torch.Tensor, torch.Tensor]]  # (start, end, new slots, context slots)


class ReferenceAttention:
    def __init__(self, cache: PagedKVCache):
        self.cache = cache

    def host_index(self, chunks: list[SequenceChunk]) -> HostArrays:
        bs = self.cache.block_size
        arrays, bounds = {}, []
        for i, c in enumerate(chunks):
            arrays[f"context{i}"] = chunk_slots(c.block_table, 0, c.end, bs)
            bounds.append((c.start, c.end))

        def finish(t: dict[str, torch.Tensor]) -> ReferenceIndex:
            return ReferenceIndex([(s, e, t[f"context{i}"][s:e], t[f"context{i}"]) for i, (s, e) in enumerate(bounds)])

        return HostArrays(arrays, finish)

    def __call__(self, layer: int, index: ReferenceIndex, q, k, v) -> torch.Tensor:
        return _attend(self.cache, layer, index.spans, q, k, v)

    def attend_cached(self, layer: int, index: ReferenceIndex, q) -> CachedPartial:
        """q-first, decode rows only: each row's attention over its context before the new
        token, in float32, with the log-sum-exp of the scaled scores (-inf, o 0: no token)."""
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), device=q.device)
        scale, group = 1.0 / math.sqrt(q.shape[-1]), q.shape[1] // self.cache.k[layer].shape[1]
        for row, (start, end, _, context) in enumerate(index.spans):
            assert end == start + 1, "attend_cached takes decode rows only"
            if start == 0:
                continue
            keys, values = (t.repeat_interleave(group, dim=1).transpose(0, 1).float()    # [h, ctx, d]
                            for t in self.cache.read(layer, context[:start]))
            scores = torch.matmul(keys, q[row].float()[:, :, None])[..., 0] * scale    # [h, ctx]
            lse[row] = torch.logsumexp(scores, dim=-1)
            out[row] = torch.matmul(torch.exp(scores - lse[row, :, None])[:, None, :], values)[:, 0]
        return CachedPartial(out, lse)

    def append_and_merge(self, layer: int, index: ReferenceIndex, partial: CachedPartial, q, k, v) -> torch.Tensor:
        new_slots = torch.cat([slots for _, _, slots, _ in index.spans])
        return append_and_merge(self.cache, layer, new_slots, partial, q, k, v)
