"""The online softmax over paged K/V tiles that both Triton attention kernels run: decode
(triton_paged.py, one query per request) and prefill (triton_prefill.py, a chunk's queries).

`attend_tiles` gathers each K/V tile through a request's block-table row (`tile_rows`: one
table entry per tile when the tile lies inside one block, else one per token, so any block
size works and a tile may span blocks), dequantizes an FP8 tile in registers, and folds it into the running
max, sum and output (flash attention's update, in float32). Scores are kept in base 2: the
caller's score scale includes log2(e) (`LOG2E`), so that exp2, the native instruction, does
the exponentials; the running max is in base 2 too (times `LN2` it is natural again). Written
once so that the two kernels' arithmetic cannot drift apart.

No Triton on the machine (CPU, CI): importing this module still works.
"""

from __future__ import annotations

import math

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install
    triton = None

LOG2E = 1.4426950408889634  # log2(e): natural-log scores times this are base-2 scores
LN2 = math.log(2.0)         # a base-2 statistic times this is natural again


if triton is not None:
    # A kernel reads only constexpr globals (Triton's interpreter allows any: only a real
    # compile refuses a plain float).
    LN2_K = tl.constexpr(LN2)

    @triton.jit
    def tile_rows(table_row_ptr, tile, end, stride_kblk, stride_ktok, MASKED: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """[BLOCK_N] cache offsets (KV head excluded) of the keys at positions tile .. tile +
        BLOCK_N - 1 (`tile` a multiple of BLOCK_N), read through a request's block-table row;
        MASKED: entries of keys at `end` or later are not read (offset 0). A tile inside one
        block reads one entry; a tile spanning blocks reads an entry per token."""
        k_pos = tile + tl.arange(0, BLOCK_N)
        if BLOCK_SIZE % BLOCK_N == 0:  # the tile lies inside one block
            block = tl.load(table_row_ptr + tile // BLOCK_SIZE).to(tl.int64)
            rows = block * stride_kblk + (k_pos % BLOCK_SIZE) * stride_ktok
        else:
            if MASKED:
                block = tl.load(table_row_ptr + k_pos // BLOCK_SIZE, mask=k_pos < end, other=0)
            else:
                block = tl.load(table_row_ptr + k_pos // BLOCK_SIZE)
            rows = block.to(tl.int64) * stride_kblk + (k_pos % BLOCK_SIZE) * stride_ktok
        return rows

    @triton.jit
    def attend_tiles(acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, table_row_ptr, kv_head_off,
                     stride_kblk, stride_ktok, lo, hi, end, qk_scale,
                     MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr):
        """Online softmax of the rows of `q` over the key tiles lo, lo + BLOCK_N, ... < hi (lo
        a multiple of BLOCK_N); returns the updated (acc, m_i, l_i). `qk_scale` includes
        log2(e) (and an FP8 cache's K scale). MASKED: a row at position `q_pos` sees keys at
        positions <= it and < `end`; every masked tile holds a key each row sees (a key <=
        q_pos at its start), so no row's max is -inf (no NaN from -inf - -inf). Not MASKED:
        every key of every tile is visible (the caller guarantees it), and the loads are
        unmasked, so they vectorize fully. An FP8 tile converts to q's dtype: the caller picks
        the dots' type by the q it passes."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        for tile in range(lo, hi, BLOCK_N):
            k_pos = tile + offs_n
            valid = k_pos < end
            row = tile_rows(table_row_ptr, tile, end, stride_kblk, stride_ktok, MASKED, BLOCK_N,
                            BLOCK_SIZE) + kv_head_off
            if MASKED:
                k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
                v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
            else:
                k = tl.load(k_ptr + row[:, None] + offs_d[None, :])
                v = tl.load(v_ptr + row[:, None] + offs_d[None, :])
            if FP8:
                k, v = k.to(q.dtype), v.to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            if MASKED:
                s = tl.where((k_pos[None, :] <= q_pos[:, None]) & valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        return acc, m_i, l_i
