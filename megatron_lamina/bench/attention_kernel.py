"""Benchmark (a): our paged decode kernel against torch SDPA on the same K/V laid out
contiguously, for tools/bench_attention.py (GPU only).

`make_inputs` builds a random paged cache with shuffled block tables; `check_mixed_lengths`
holds the kernel to a float32 reference over mixed context lengths, block sizes and forced
context splits; `measure` times one batch x context x block size shape: every kernel tile
configuration tried (the fastest kept), replayed from a CUDA graph of ten calls alternating
two input sets (as the engine runs it: no Python launch cost), one eager call for
comparison, SDPA the same way, each also as a fraction of the device's copy bandwidth
(K and V read once, plus q and o).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from megatron_lamina.attention.triton_paged import paged_decode
from megatron_lamina.bench.timing import graph_ms, time_ms


def make_inputs(batch, ctx, block_size, heads, kv_heads, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = math.ceil(ctx / block_size)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, kv_heads, block_size, d, dtype=dtype, device="cuda", generator=g)
    v_cache = torch.randn(num_blocks, kv_heads, block_size, d, dtype=dtype, device="cuda", generator=g)
    tables = torch.randperm(num_blocks, device="cuda", generator=g).view(batch, blocks_per_seq).int()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, d, dtype=dtype, device="cuda", generator=g)
    return q, k_cache, v_cache, tables, lens


def contiguous(k_cache, tables, ctx):
    """[batch, kv_heads, ctx, d] from the paged cache (the same values, laid out densely)."""
    dense = k_cache[tables.long()]                    # [batch, blocks, kv_heads, block_size, d]
    dense = dense.transpose(2, 3).flatten(1, 2)[:, :ctx]  # [batch, ctx, kv_heads, d]
    return dense.transpose(1, 2).contiguous()


def reference(q, k_dense, v_dense):
    """float32 attention of q [batch, heads, d] over [batch, kv_heads, ctx, d], per GQA group."""
    batch, heads, d = q.shape
    kv_heads = k_dense.shape[1]
    qg = q.float().view(batch, kv_heads, heads // kv_heads, d)
    s = torch.einsum("bkgd,bknd->bkgn", qg, k_dense.float()) / math.sqrt(d)
    return torch.einsum("bkgn,bknd->bkgd", torch.softmax(s, -1), v_dense.float()).reshape(batch, heads, d)


def sdpa(q, k_dense, v_dense):
    return F.scaled_dot_product_attention(q[:, :, None], k_dense, v_dense, enable_gqa=True)[:, :, 0]


def relative_error(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def check_mixed_lengths(heads, kv_heads, d, dtype) -> float:
    """Worst relative error over mixed context lengths, block sizes and forced splits."""
    worst = 0.0
    for block_size, splits in ((16, None), (128, 3), (256, 1), (16, 7)):
        g = torch.Generator(device="cuda").manual_seed(block_size + (splits or 0))
        lens = torch.randint(1, 3000, (7,), device="cuda", generator=g).int()
        blocks = [math.ceil(int(n) / block_size) for n in lens]
        num_blocks = sum(blocks) + 5
        kc = torch.randn(num_blocks, kv_heads, block_size, d, dtype=dtype, device="cuda", generator=g)
        vc = torch.randn_like(kc)
        perm = torch.randperm(num_blocks, device="cuda", generator=g)
        tables = torch.zeros(7, max(blocks), dtype=torch.int32, device="cuda")
        used = 0
        for i, nb in enumerate(blocks):
            tables[i, :nb] = perm[used:used + nb]
            used += nb
        q = torch.randn(7, heads, d, dtype=dtype, device="cuda", generator=g)
        out = paged_decode(q, kc, vc, tables, lens, num_splits=splits)
        for i, n in enumerate(lens.tolist()):
            ref = reference(q[i:i + 1], contiguous(kc, tables[i:i + 1], n), contiguous(vc, tables[i:i + 1], n))
            worst = max(worst, relative_error(out[i:i + 1], ref))
    return worst


def measure(batch, ctx, block_size, heads, kv_heads, d, dtype, configs, bandwidth: float) -> dict:
    """One shape: the fastest of `configs` (block_n, num_warps, num_stages, waves) tuples,
    its eager time, SDPA's, relative errors and fractions of the copy bandwidth."""
    sets = [make_inputs(batch, ctx, block_size, heads, kv_heads, d, dtype, seed) for seed in range(2)]
    q, kc, vc, tables, lens = sets[0]
    kd, vd = contiguous(kc, tables, ctx), contiguous(vc, tables, ctx)
    ref = reference(q, kd, vd)
    best = None
    for cfg in configs:
        kw = dict(zip(("block_n", "num_warps", "num_stages", "waves"), cfg), max_context=ctx)
        err = relative_error(paged_decode(q, kc, vc, tables, lens, **kw), ref)
        ms = graph_ms(lambda q, kc, vc, t, n: paged_decode(q, kc, vc, t, n, **kw), sets)
        if best is None or ms < best[1]:
            best = (kw, ms, err)
    kw = best[0]
    eager = time_ms(lambda q, kc, vc, t, n: paged_decode(q, kc, vc, t, n, **kw), repeat=20, inputs=sets)
    dense_sets = [(s[0], contiguous(s[1], s[3], ctx), contiguous(s[2], s[3], ctx)) for s in sets]
    sdpa_err = relative_error(sdpa(q, kd, vd), ref)
    sdpa_ms = graph_ms(sdpa, dense_sets)
    del dense_sets, kd, vd, sets
    torch.cuda.empty_cache()
    nbytes = 2 * batch * ctx * kv_heads * d * dtype.itemsize + 2 * batch * heads * d * dtype.itemsize
    kw.pop("max_context")
    return {"batch": batch, "context": ctx, "block_size": block_size, "kernel_config": kw,
            "paged_ms": best[1], "paged_eager_ms": eager, "paged_rel_err": best[2],
            "paged_frac_copy_bw": nbytes / (best[1] / 1e3) / bandwidth,
            "sdpa_ms": sdpa_ms, "sdpa_rel_err": sdpa_err, "sdpa_frac_copy_bw": nbytes / (sdpa_ms / 1e3) / bandwidth,
            "speedup_vs_sdpa": sdpa_ms / best[1]}


def kernel_configs(block_n: str, warps: str, stages: str, waves: str) -> list[tuple]:
    """Every combination of the comma-separated tile sizes, warps, stages and waves."""
    return list(itertools.product(map(int, block_n.split(",")), map(int, warps.split(",")),
                                  map(int, stages.split(",")), map(float, waves.split(","))))
