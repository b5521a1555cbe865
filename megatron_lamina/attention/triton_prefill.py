"""Paged causal prefill attention on the GPU: one Triton kernel for every prefill chunk of a
micro-batch, flash-attention style, reading K/V straight from the paged cache.

Each chunk is a run of query rows of `q` (its new tokens, already written into the cache) at
consecutive positions of one request; a query at position p sees that request's keys 0..p.
One program per (query head, tile of BLOCK_M rows of one chunk): it keeps its Q tile in
registers and streams the request's K/V tiles through an online softmax (running max, sum
and output in float32), so nothing of the context is gathered into a separate buffer and all
chunks of all requests take one launch. The grid is sized on the host from a bound of the
chunk lengths (`max_q_len`); tiles past a chunk's end return at once, so the launch never
reads a length back (no sync: it can be captured in a CUDA graph).

Causality is exploited per tile: keys before the tile's first query position are seen by
every row, so those key tiles run without a mask; only the few key tiles on the diagonal (up
to the tile's last position) apply the causal mask, and key tiles past it are never read.
The tiles are gathered and folded in by the online softmax the decode kernel runs too
(triton_softmax.attend_tiles: any block size, a key tile may span blocks, base-2 scores).

An FP8 cache is read as e4m3 and dequantized in registers as the decode kernel does
(triton_paged.py): tiles convert to q's dtype, the KV head's K scale folds into the score
scale and its V scale multiplies the output once.

GQA: query head h reads KV head h // group; the group's programs are adjacent in the launch
order (heads are grid axis 0), so a K/V tile read by one is usually still in L2 for the rest.

No Triton on the machine (CPU, CI): importing this module still works; `paged_prefill` is
only called on CUDA tensors (or under TRITON_INTERPRET=1, as the CPU tests do).
"""

from __future__ import annotations

import math

import torch

from megatron_lamina.attention.triton_paged import jit_unspecialized
from megatron_lamina.attention.triton_softmax import LOG2E

try:
    import triton
    import triton.language as tl

    from megatron_lamina.attention.triton_softmax import attend_tiles
except ImportError:  # CPU-only install
    triton = None


if triton is not None:

    @jit_unspecialized(values=["stride_tb"], pointers=["table_ptr", "q_starts_ptr", "q_lens_ptr", "pos0_ptr"])
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, table_ptr, q_starts_ptr, q_lens_ptr, pos0_ptr, k_scale_ptr, v_scale_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kblk, stride_kh, stride_ktok, stride_tb,
        qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr,
    ):
        h, m_tile, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        # The grid has cdiv(max_q_len, BLOCK_M) tiles per chunk; a shorter chunk's extra
        # tiles have nothing to do (this is what keeps the grid a host-side number).
        q_len = tl.load(q_lens_ptr + c)
        m_start = m_tile * BLOCK_M
        if m_start >= q_len:
            return
        q_row0 = tl.load(q_starts_ptr + c).to(tl.int64)
        pos0 = tl.load(pos0_ptr + c)
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        m_mask = offs_m < q_len
        q_pos = pos0 + offs_m                              # positions of this tile's queries
        rows = q_row0 + offs_m
        q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        table_row_ptr = table_ptr + c.to(tl.int64) * stride_tb
        kv_head_off = (h // GROUP).to(tl.int64) * stride_kh
        v_scale = 1.0
        if FP8:  # the KV head's scales: K's folds into the score scale, V's into the output
            qk_scale = qk_scale * tl.load(k_scale_ptr + h // GROUP)
            v_scale = tl.load(v_scale_ptr + h // GROUP)
        # Keys 0..pos0 + m_start (the first query's position) are seen by every row: whole
        # key tiles below that need no mask. The rest, up to the last query's position
        # (`end`, exclusive), is the diagonal, masked; nothing past `end` is read.
        end = pos0 + tl.minimum(m_start + BLOCK_M, q_len)
        full = (pos0 + m_start + 1) // BLOCK_N * BLOCK_N
        acc, m_i, l_i = attend_tiles(acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, table_row_ptr, kv_head_off,
                                     stride_kblk, stride_ktok, 0, full, end, qk_scale,
                                     False, HEAD_DIM, BLOCK_N, BLOCK_SIZE, PRECISION, FP8)
        acc, m_i, l_i = attend_tiles(acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, table_row_ptr, kv_head_off,
                                     stride_kblk, stride_ktok, full, end, end, qk_scale,
                                     True, HEAD_DIM, BLOCK_N, BLOCK_SIZE, PRECISION, FP8)
        out = o_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
        tl.store(out, (acc * (v_scale / l_i)[:, None]).to(o_ptr.dtype.element_ty), mask=m_mask[:, None])


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor,
                  positions0: torch.Tensor, out: torch.Tensor, max_q_len: int, *,
                  block_m: int = 64, block_n: int = 64, num_warps: int = 4,
                  num_stages: int = 2, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of every prefill chunk of a micro-batch over the paged cache, one launch.

    q [tokens, heads, d]; k_cache, v_cache [blocks, kv_heads, block_size, d] (same strides),
    already holding the chunks' own new K/V; per chunk c (int32 tensors on q's device):
    block_tables[c] [chunks, max_blocks] its request's blocks, q_starts[c] its first row of q,
    q_lens[c] its row count n_c, positions0[c] the position of its first token (0: a fresh
    prompt). Rows q_starts[c] .. + n_c - 1 are positions positions0[c] .. + n_c - 1, and the
    query at position p attends to keys 0..p of its request (GQA: query head h uses KV head
    h // (heads // kv_heads)); scale 1/sqrt(d), softmax in float32. The result is written
    into those rows of `out` ([tokens, heads, d], q's dtype), which is returned; other rows of
    `out` (decode rows, other chunks) are not touched. `max_q_len` >= every q_lens, known on
    the host: it sizes the grid, so no length is read back (no sync; CUDA-graph capturable).
    d a power of two >= 16; block_m, block_n powers of two >= 16; any block_size.
    float32 runs the dots in full precision (no TF32), as paged_decode does. An e4m3 cache
    takes its scales, `k_scale` and `v_scale` [kv_heads] float32, as paged_decode does."""
    _, heads, head_dim = q.shape
    _, kv_heads, block_size, _ = k_cache.shape
    chunks = q_lens.shape[0]
    assert heads % kv_heads == 0 and out.shape == q.shape and out.dtype == q.dtype
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride(3) == 1
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim: a power of two >= 16"
    assert block_m >= 16 and block_n >= 16, "tl.dot needs tiles of at least 16"
    if chunks == 0 or max_q_len <= 0:
        return out
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert not fp8 or (k_scale is not None and v_scale is not None), "an e4m3 cache reads with its scales"
    grid = (heads, triton.cdiv(max_q_len, block_m), chunks)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, q_starts, q_lens, positions0,
        k_scale if fp8 else q_lens, v_scale if fp8 else q_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        LOG2E / math.sqrt(head_dim),
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8=fp8, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
