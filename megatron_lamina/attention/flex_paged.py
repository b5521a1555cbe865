"""Paged decode attention through PyTorch's `flex_attention`: the library route of the GPU issue.

flex_attention reads K and V of shape `[1, kv_heads, tokens, head_dim]`, so the paged pool is
laid out head-major, `[kv_heads, blocks, block_size, head_dim]`, and viewed as one long
sequence of `blocks * block_size` tokens shared by the whole batch (flex broadcasts a KV batch
of one). A request's block table becomes the block mask's KV indices, with its KV block size
equal to the cache block size: every block but the last is a *full* block (the fused kernel
applies no mask there), the last one is a *partial* block. The `mask_mod` is exact on its own
(flex's unfused path applies it to every key): a key counts when its block belongs to the row
(a pool-sized owner table, blocks are never shared) and its logical position is below the
row's length.

`tools/bench_attention.py` times this against our Triton kernel and SDPA; CPU tests check it
against the float32 reference in eager mode (flex_attention's unfused path).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention


def decode_block_mask(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                      num_blocks: int) -> BlockMask:
    """Block mask of a decode batch over a head-major pool of `num_blocks` blocks.
    block_tables [batch, width] (physical block ids; a block belongs to one request),
    context_lens [batch] (>= 1)."""
    batch, width = block_tables.shape
    device = block_tables.device
    lens = context_lens.to(device=device, dtype=torch.int32)
    used = (lens + block_size - 1) // block_size                              # blocks per request
    tables = block_tables.to(torch.int32)
    last = tables.gather(1, (used - 1).long()[:, None])                       # [batch, 1]
    # The mask itself, exact everywhere (flex's unfused path applies it to every key): a
    # key is kept when its block is one of row b's and its position is below b's length.
    cols = torch.arange(width, device=device, dtype=torch.int32).expand(batch, width)
    live = cols < used[:, None]
    owner = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)
    logical = torch.zeros(num_blocks, dtype=torch.int32, device=device)
    owner[tables[live].long()] = torch.arange(batch, device=device, dtype=torch.int32)[:, None].expand(
        batch, width)[live]
    logical[tables[live].long()] = cols[live]

    def in_context(b, h, q_idx, kv_idx):
        block = kv_idx // block_size
        return (owner[block] == b) & (logical[block] * block_size + kv_idx % block_size < lens[b])

    # The sparsity: every block but the last is full (the fused kernel skips the mask
    # there); the last block is partial. The fused kernel expects index rows as wide as the
    # KV sequence has blocks (the whole pool), as torch's own paged-attention helper pads them.
    full = torch.zeros(batch, num_blocks, dtype=torch.int32, device=device)
    full[:, :width] = tables
    partial = torch.zeros(batch, num_blocks, dtype=torch.int32, device=device)
    partial[:, :1] = last
    ones = torch.ones(batch, 1, 1, dtype=torch.int32, device=device)
    return BlockMask.from_kv_blocks(
        ones, partial.view(batch, 1, 1, num_blocks), (used - 1).view(batch, 1, 1), full.view(batch, 1, 1, num_blocks),
        BLOCK_SIZE=(128, block_size), mask_mod=in_context, seq_lengths=(1, num_blocks * block_size),
        compute_q_blocks=False)


def flex_paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_mask: BlockMask,
                      attend=flex_attention) -> torch.Tensor:
    """q [batch, heads, d]; pools [kv_heads, blocks, block_size, d] -> o [batch, heads, d].
    `attend` is flex_attention or a `torch.compile`d copy of it (the fused kernel)."""
    kv_heads, blocks, block_size, d = k_pool.shape
    k = k_pool.view(1, kv_heads, blocks * block_size, d)
    v = v_pool.view(1, kv_heads, blocks * block_size, d)
    return attend(q[:, :, None], k, v, block_mask=block_mask, enable_gqa=True)[:, :, 0]
