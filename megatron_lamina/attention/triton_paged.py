"""Paged decode attention on the GPU: one Triton kernel, flash-decoding style.

Decode attention is bound by reading each request's K and V once, so the kernel is built
around that read (the cache is laid out [blocks, kv_heads, block_size, head_dim], so a
tile inside one block is one contiguous stretch of memory): one program per (request, KV
head, split) loads every K/V tile of that
head exactly once and applies it to all `heads/kv_heads` query heads of the group (GQA:
the group's queries are the rows of one `tl.dot`, padded to 16). The tiles are gathered and
folded in by the online softmax the prefill kernel runs too (triton_softmax.attend_tiles:
any block size, a tile may span blocks, base-2 scores), the one query at its request's last
position. Long contexts with few (request, head) pairs are split along the context; a
second small kernel merges the splits with their log-sum-exp, exactly. That log-sum-exp is
also returned on request (`return_lse`): q-first attends the cached tokens with it and
merges the new token's term afterwards (lse_merge.py).
An FP8 cache (kv_cache.py: e4m3 with a float32 scale per KV head) is read as e4m3, half the
bytes, and dequantized in registers: a tile converts to float16 exactly (e4m3's 3 mantissa
bits and its exponents fit) and the dots run in float16, and the program's one KV head has one
scale for K and one for V, which multiply the scores and the output once instead of every
element. `paged_decode`'s settings (the dots' type for e4m3, the tile, warps, stages and
splits) are the same attention, run differently; bench/fp8_speed.py's sweep measures them,
and the defaults are its best rows. (Full tiles unmasked, 64 query rows, keys as the dots'
rows and block-table entries per block were measured slower and removed: docs/BENCHMARKS.md.)

No Triton on the machine (CPU, CI): importing this module still works; `paged_decode`
is only called on CUDA tensors.
"""

from __future__ import annotations

import math

import torch

from megatron_lamina.attention.triton_softmax import LOG2E

try:
    import triton
    import triton.language as tl

    from megatron_lamina.attention.triton_softmax import LN2_K, attend_tiles
except ImportError:  # CPU-only install
    triton = None


def jit_unspecialized(values=(), pointers=()):
    """`triton.jit`, told not to specialize on these integer arguments' values (==1, %16) and
    these pointers' alignment, where this Triton knows how (a compile mid-serving costs
    seconds; the index tensors are views at any offset of a step's one host-to-device copy)."""
    import inspect

    options = {"do_not_specialize": list(values)}
    if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
        options["do_not_specialize_on_alignment"] = list(pointers)
    return triton.jit(**options)


if triton is not None:

    @triton.jit
    def f16_queries(q, qk_scale):
        """q in float16 for float16 dots over e4m3 tiles, and the score scale to use with it.
        float16 holds any e4m3 value exactly but overflows past 65504, where bf16 q does not: a
        program whose largest |q| passes 2**15 divides q by a power of two and multiplies the
        score scale by it (exact; only elements 2**24 below the largest lose bits, which
        float16's rounding of the largest term already outweighs)."""
        q = q.to(tl.float32)
        q_max = tl.max(tl.max(tl.abs(q), axis=1), axis=0)
        shift = tl.maximum(tl.ceil(tl.log2(tl.maximum(q_max, 1.0))) - 15.0, 0.0)
        return (q * tl.exp2(-shift)).to(tl.float16), qk_scale * tl.exp2(shift)

    @jit_unspecialized(values=["stride_tb"], pointers=["table_ptr", "lens_ptr"])
    def _decode_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, o_ptr, m_ptr, l_ptr, k_scale_ptr, v_scale_ptr,
        stride_qb, stride_qh, stride_kblk, stride_kh, stride_ktok, stride_tb,
        stride_ob, stride_os, stride_oh, qk_scale,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr,
        F16_DOTS: tl.constexpr,
    ):
        b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        v_scale = 1.0
        if FP8:  # the KV head's scales: K's folds into the score scale, V's into the output
            qk_scale = qk_scale * tl.load(k_scale_ptr + h)
            v_scale = tl.load(v_scale_ptr + h)
        length = tl.load(lens_ptr + b)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, HEAD_DIM)
        g_mask = offs_g < GROUP
        q = tl.load(q_ptr + b * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None], other=0.0)
        if F16_DOTS:
            q, qk_scale = f16_queries(q, qk_scale)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        # Each request's own context is cut into the splits (so a graph captured for a long
        # context bound still spreads a short context over all of them).
        per_split = tl.cdiv(tl.cdiv(length, BLOCK_N), tl.num_programs(2)) * BLOCK_N
        start = split * per_split
        end = tl.minimum(length, start + per_split)
        q_pos = tl.zeros([BLOCK_G], tl.int32) + (length - 1)  # the query's position: every key < length
        table_row_ptr = table_ptr + b * stride_tb
        acc, m_i, l_i = attend_tiles(acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, table_row_ptr, h * stride_kh,
                                     stride_kblk, stride_ktok, start, end, end, qk_scale,
                                     True, HEAD_DIM, BLOCK_N, BLOCK_SIZE, PRECISION, FP8)
        out = o_ptr + b * stride_ob + split * stride_os + (h * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :]
        tl.store(out, acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None], mask=g_mask[:, None])
        stats = (b * tl.num_programs(2) + split) * tl.num_programs(1) * GROUP + h * GROUP + offs_g
        tl.store(m_ptr + stats, m_i * LN2_K, mask=g_mask)  # base 2 (attend_tiles) to natural, as merged
        tl.store(l_ptr + stats, l_i, mask=g_mask)

    @jit_unspecialized(values=["splits"])
    def _merge_kernel(part_ptr, m_ptr, l_ptr, o_ptr, lse_ptr, splits, heads, HEAD_DIM: tl.constexpr,
                      WRITE_LSE: tl.constexpr):
        b, hq = tl.program_id(0), tl.program_id(1)
        offs_d = tl.arange(0, HEAD_DIM)
        m_max = float("-inf")
        for s in range(splits):
            m_max = tl.maximum(m_max, tl.load(m_ptr + (b * splits + s) * heads + hq))
        # No key in any split (an empty context, q-first only): weights 0, output 0, lse -inf.
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        total = 0.0
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for s in range(splits):
            idx = (b * splits + s) * heads + hq
            w = tl.load(l_ptr + idx) * tl.exp(tl.load(m_ptr + idx) - m_max)
            acc += w * tl.load(part_ptr + idx * HEAD_DIM + offs_d)
            total += w
        tl.store(o_ptr + (b * heads + hq) * HEAD_DIM + offs_d, acc / tl.where(total > 0, total, 1.0))
        if WRITE_LSE:
            tl.store(lse_ptr + b * heads + hq, m_max + tl.log(total))


FP8_DOTS = ("q", "fp16")  # an e4m3 cache's dot type: q's dtype, or float16


def default_block_n(fp8: bool) -> int:
    """Keys a tile by default: an e4m3 tile of 128 moves the bytes of a bf16 tile of 64."""
    return 128 if fp8 else 64


def default_dots(q_dtype: torch.dtype) -> str:
    """The dots' type over an e4m3 cache by default: float16 for a 16-bit q, since Hopper
    converts a pair of e4m3 values to float16 in one instruction and to bfloat16 only through
    float16; a float32 q (CPU runs, tests) keeps its full-precision dots."""
    return "q" if q_dtype == torch.float32 else "fp16"


def default_stages(fp8: bool, block_n: int) -> int:
    """Pipeline stages by default: an e4m3 tile moves half the bytes of a bf16 one, so it keeps
    more tiles in flight to hide the same memory latency; a tile larger than the default's
    keeps three, as five of them would not fit a Hopper SM's shared memory."""
    return 5 if fp8 and block_n <= default_block_n(True) else 3


def split_count(batch: int, kv_heads: int, max_len: int, block_n: int, waves: float, device: torch.device) -> int:
    """Splits of each context: about `waves` programs per multiprocessor, at most one a tile."""
    tiles = max(1, math.ceil(max_len / block_n))
    # (Triton's interpreter on a CPU, in the tests: a few "multiprocessors".)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(tiles, math.ceil(waves * sms / max(1, batch * kv_heads))))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, block_n: int | None = None,
                 num_splits: int | None = None, num_warps: int = 4, num_stages: int | None = None,
                 waves: float = 2.0, max_context: int | None = None, return_lse: bool = False,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                 fp8_dots: str | None = None):
    """q [batch, heads, d]; caches [blocks, kv_heads, block_size, d]; block_tables [batch,
    max_blocks] int32; context_lens [batch] int32 (keys 0..len-1 are attended) -> o like q.
    Without `num_splits`, contexts are split so that there are about `waves` programs per
    multiprocessor. float32 runs the dots in full precision (no TF32). `max_context`, an upper
    bound of `context_lens` known on the host, avoids reading them back (a device sync, and
    not allowed while a CUDA graph is captured).
    `return_lse` (q-first, attention/lse_merge.py): returns (o, lse) instead, o in float32 and
    lse [batch, heads] float32, the natural log-sum-exp of each query head's scaled scores (the
    statistics the splits are merged with); a context of 0 keys gives o = 0 and lse = -inf.
    An e4m3 cache takes its scales, `k_scale` and `v_scale` [kv_heads] float32 (a stored x
    means x * scale).
    Settings, the same attention (bench/fp8_speed.py times them): `fp8_dots` "fp16" runs an
    e4m3 cache's dots in float16 (q cast once per program, see `f16_queries`), "q" in q's
    dtype (a bf16 cache ignores it; the default is `default_dots`); `num_stages` defaults to
    `default_stages`. The dots' rows are the group's queries, padded to a power of two of
    at least 16 (the least `tl.dot` takes)."""
    fp8_dots = default_dots(q.dtype) if fp8_dots is None else fp8_dots
    if fp8_dots not in FP8_DOTS:
        raise ValueError(f"paged_decode: fp8_dots={fp8_dots!r}; allowed: {', '.join(FP8_DOTS)}")
    batch, heads, head_dim = q.shape
    _, kv_heads, block_size, _ = k_cache.shape
    group = heads // kv_heads
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    block_n = default_block_n(fp8) if block_n is None else block_n
    max_len = max_context if max_context is not None else (int(context_lens.max()) if batch else 0)
    if num_splits is None:
        num_splits = split_count(batch, kv_heads, max_len, block_n, waves, q.device)
    # One split writes the output directly (the store casts); several write float32 partials.
    part = torch.empty(batch, num_splits, heads, head_dim, device=q.device,
                       dtype=q.dtype if num_splits == 1 and not return_lse else torch.float32)
    m = torch.empty(batch, num_splits, heads, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    assert not fp8 or (k_scale is not None and v_scale is not None), "an e4m3 cache reads with its scales"
    _decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, m, l,
        k_scale if fp8 else m, v_scale if fp8 else m,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), part.stride(0), part.stride(1), part.stride(2),
        LOG2E / math.sqrt(head_dim),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_N=block_n, BLOCK_SIZE=block_size,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8=fp8,
        F16_DOTS=fp8 and fp8_dots == "fp16",
        num_warps=num_warps, num_stages=num_stages if num_stages is not None else default_stages(fp8, block_n),
    )
    if num_splits == 1:
        return (part[:, 0], m[:, 0] + torch.log(l[:, 0])) if return_lse else part[:, 0]
    out = torch.empty(batch, heads, head_dim, device=q.device, dtype=torch.float32 if return_lse else q.dtype)
    lse = torch.empty(batch, heads, device=q.device, dtype=torch.float32) if return_lse else m
    _merge_kernel[(batch, heads)](part, m, l, out, lse, num_splits, heads, HEAD_DIM=head_dim, WRITE_LSE=return_lse)
    return (out, lse) if return_lse else out
