"""flex_attention over the paged cache (attention/flex_paged.py) against the reference attention.

On CPU flex_attention runs its unfused path, which applies the block mask's `mask_mod` to
every key; the GPU test (test_gpu.py) runs the compiled kernel, which uses the block
sparsity. Both must equal `reference.attend_chunks` on the same cache and block tables.
"""

from __future__ import annotations

import math
import shutil
import warnings

import numpy as np
import pytest
import torch

from megatron_lamina.attention.flex_paged import decode_block_mask, flex_paged_decode
from megatron_lamina.attention.kv_cache import PagedKVCache, padded_block_tables
from megatron_lamina.attention.reference import attend_chunks
from megatron_lamina.plan import SequenceChunk


def random_decode_batch(lens, block_size, heads=8, kv_heads=2, d=16, seed=0, device="cpu"):
    """A cache with random contents, one decode chunk per length, shuffled block tables."""
    g = torch.Generator().manual_seed(seed)
    blocks = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(blocks) + 3
    cache = PagedKVCache(1, num_blocks, block_size, kv_heads, d, torch.float32, device)
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    order = torch.randperm(num_blocks, generator=g).tolist()
    chunks, used = [], 0
    for n, nb in zip(lens, blocks):
        chunks.append(SequenceChunk(request_id=len(chunks), shard=0, start=n - 1, tokens=[0], new_blocks=[],
                                    block_table=order[used:used + nb], sample=True))
        used += nb
    q = torch.randn(len(lens), heads, d, generator=g)
    kv = torch.randn(len(lens), kv_heads, d, generator=g)
    return cache, chunks, q, kv


def flex_over(cache, chunks, q, attend=None, extra_columns=0, device="cpu", dtype=torch.float32):
    """flex_paged_decode of `q` over the cache's layer 0 (pools made head-major, block tables
    padded by `padded_block_tables`, `extra_columns` more), on `device` in `dtype`."""
    lens = torch.tensor([c.end for c in chunks])
    tables = padded_block_tables([c.block_table for c in chunks], 0)
    tables = torch.from_numpy(np.pad(tables, ((0, 0), (0, extra_columns))))
    mask = decode_block_mask(tables.to(device), lens.to(device), cache.block_size, cache.num_blocks)
    pools = [pool[0].transpose(0, 1).contiguous().to(device, dtype) for pool in (cache.k, cache.v)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": the unfused path is the point
        return flex_paged_decode(q.to(device, dtype), *pools, mask, **({"attend": attend} if attend else {}))


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_flex_matches_reference(block_size):
    cache, chunks, q, kv = random_decode_batch([1, 5, 16, 17, 40, 33, 4], block_size)
    ref = attend_chunks(cache, 0, chunks, q, kv, kv)      # writes the new tokens, then attends
    out = flex_over(cache, chunks, q, extra_columns=2)    # tables padded past the used blocks
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_foreign_block_is_not_attended():
    """Two rows; row 1's keys made huge: row 0 must not see them."""
    cache, chunks, q, kv = random_decode_batch([9, 9], 4)
    for block in chunks[1].block_table:
        cache.v[0][block] = 1e4
    ref = attend_chunks(cache, 0, chunks[:1], q[:1], kv[:1], kv[:1])
    out = flex_over(cache, chunks, q)
    torch.testing.assert_close(out[:1], ref, rtol=1e-5, atol=1e-5)
    assert out[1].abs().max() > 1e3


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_flex_uses_the_block_sparsity_correctly():
    """The compiled kernel skips the mask on full blocks and reads only listed blocks: it
    must still equal the reference (the GPU test runs the same check on CUDA)."""
    from torch.nn.attention.flex_attention import flex_attention

    cache, chunks, q, kv = random_decode_batch([1, 5, 16, 17, 40, 333, 100, 64], 16)
    ref = attend_chunks(cache, 0, chunks, q, kv, kv)
    out = flex_over(cache, chunks, q, attend=torch.compile(flex_attention))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
