"""q-first decode attention on the reference backend (attention/lse_merge.py,
attention/reference.py): attending the cached tokens, then appending the new token and
merging its term by log-sum-exp, must equal appending and attending the whole context.

Random float32 caches and queries; decode rows at random positions, one with no cached token
(position 0: the partial is empty, lse -inf); MHA and GQA groups; block sizes of 1 token, a
few and many. Both paths start from the same cache and must leave the same cache behind.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lamina.attention.kv_cache import PagedKVCache
from megatron_lamina.attention.lse_merge import CachedPartial, merge_new_token
from megatron_lamina.attention.reference import ReferenceAttention
from megatron_lamina.host_to_device import to_device
from megatron_lamina.plan import SequenceChunk

LAYERS = 2


def decode_batch(positions, block_size, kv_heads, d, seed):
    """Two identical caches of random history and one decode chunk per position, each its
    own request with shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    needed = [math.ceil((p + 1) / block_size) for p in positions]
    num_blocks = sum(needed) + 2
    order = torch.randperm(num_blocks, generator=g).tolist()
    chunks, used = [], 0
    for i, (p, n) in enumerate(zip(positions, needed)):
        chunks.append(SequenceChunk(i, 0, p, [0], [], True, block_table=order[used:used + n]))
        used += n
    caches = [PagedKVCache(LAYERS, num_blocks, block_size, kv_heads, d, torch.float32) for _ in range(2)]
    for layer in range(LAYERS):
        history = torch.randn(2, num_blocks, kv_heads, block_size, d, generator=g)
        for cache in caches:
            cache.k[layer].copy_(history[0])
            cache.v[layer].copy_(history[1])
    return chunks, caches, g


@pytest.mark.parametrize("block_size, kv_heads, group, positions", [
    (1, 2, 1, [0, 1, 9, 30]),           # MHA, a block per token
    (4, 2, 3, [5, 0, 16, 33, 3]),       # GQA 3, contexts ending at and across block edges
    (16, 1, 4, [40, 15, 0, 1]),         # GQA 4, one KV head
])
def test_merge_equals_attention_over_the_whole_context(block_size, kv_heads, group, positions):
    d = 16
    chunks, (full_cache, merged_cache), g = decode_batch(positions, block_size, kv_heads, d, seed=block_size)
    full, merged = ReferenceAttention(full_cache), ReferenceAttention(merged_cache)
    [index] = to_device([full.host_index(chunks)], torch.device("cpu"))
    rows = len(positions)
    for layer in range(LAYERS):
        q, k, v = (torch.randn(rows, h, d, generator=g) for h in (kv_heads * group, kv_heads, kv_heads))
        want = full(layer, index, q, k, v)
        partial = merged.attend_cached(layer, index, q)
        empty = torch.tensor(positions) == 0
        assert torch.isneginf(partial.lse[empty]).all() and torch.isfinite(partial.lse[~empty]).all()
        assert not torch.isnan(partial.out).any()
        got = merged.append_and_merge(layer, index, partial, q, k, v)
        assert got.dtype == q.dtype
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (layer, (got - want).abs().max())
        assert torch.allclose(got[empty], v[empty].repeat_interleave(group, dim=1)), "no cached token: o = v_new"
        assert torch.equal(full_cache.k[layer], merged_cache.k[layer])
        assert torch.equal(full_cache.v[layer], merged_cache.v[layer])


def test_merge_weighs_the_new_token_by_its_score():
    """One cached key with score s_c and the new key with s_n: o = softmax([s_c, s_n]) . [v_c, v_n]."""
    d = 4
    q = torch.tensor([[[2.0, 0.0, 0.0, 0.0]]])
    k_new = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])         # s_n = 2 / sqrt(4) = 1
    v_new = torch.full((1, 1, d), 3.0)
    v_cached = torch.full((1, 1, d), -1.0)
    partial = CachedPartial(v_cached, torch.tensor([[-0.5]]))  # one cached key of score -0.5
    w = torch.softmax(torch.tensor([-0.5, 1.0]), dim=0)
    want = w[0] * v_cached + w[1] * v_new
    assert torch.allclose(merge_new_token(partial, q, k_new, v_new), want, atol=1e-6, rtol=0)
