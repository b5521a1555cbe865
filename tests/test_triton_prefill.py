"""The Triton paged attention kernels (attention/triton_prefill.py, attention/triton_paged.py)
against float64 torch references (the q-first log-sum-exp against the float32 reference
backend), on CPU through Triton's interpreter.

Skipped where Triton is not installed (CI). Without a CUDA device TRITON_INTERPRET=1 is set
before Triton is imported, so the kernels run as numpy on the CPU: float32 dots are exact
("ieee"), hence the tight tolerance. Shapes are tiny because the interpreter is slow; the
realistic bfloat16 shape is in test_gpu.py. The interpreter does not check GPU limits
(shared memory, registers) nor compile the kernels, so this covers indexing and math only.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _kernels(name: str):
    """The kernels' module. The interpreter must have been on when triton was first imported
    (conftest.py sees to that for the whole suite): triton's own @jit helpers (tl.sum, ...)
    are decorated then, and a kernel decorated for the GPU stays so."""
    module = importlib.import_module(f"megatron_lamina.attention.{name}")
    kernel = module._prefill_kernel if name == "triton_prefill" else module._decode_kernel
    if INTERPRETED and not all(type(f).__name__ == "InterpretedFunction" for f in (kernel, triton.language.sum)):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file alone")
    return module


def random_prefill_batch(chunks, block_size, heads, kv_heads, d, dtype=torch.float32, seed=0, device=DEVICE):
    """A random paged cache and one prefill chunk per (start, n) of `chunks`, each its own
    request with a shuffled block table (padded by 2 columns of other blocks). Decode-like
    rows (0, 1, 2, ... of them) lie before each chunk and one at the end: the kernel must not
    touch them. Returns the kernel's inputs and those rows."""
    g = torch.Generator().manual_seed(seed)
    blocks = [math.ceil((start + n) / block_size) for start, n in chunks]
    num_blocks = sum(blocks) + 3
    k_cache = torch.randn(num_blocks, kv_heads, block_size, d, generator=g)
    v_cache = torch.randn(num_blocks, kv_heads, block_size, d, generator=g)
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(0, num_blocks, (len(chunks), max(blocks) + 2), generator=g)
    q_starts, untouched, row, used = [], [], 0, 0
    for c, nb in enumerate(blocks):
        tables[c, :nb] = order[used:used + nb]
        used += nb
        untouched += range(row, row + c)
        row += c
        q_starts.append(row)
        row += chunks[c][1]
    untouched.append(row)
    q = torch.randn(row + 1, heads, d, generator=g)
    ints = {"dtype": torch.int32, "device": device}
    return {"q": q.to(device, dtype), "k_cache": k_cache.to(device, dtype), "v_cache": v_cache.to(device, dtype),
            "block_tables": tables.to(**ints), "q_starts": torch.tensor(q_starts, **ints),
            "q_lens": torch.tensor([n for _, n in chunks], **ints),
            "positions0": torch.tensor([start for start, _ in chunks], **ints)}, untouched


def reference_prefill(q, k_cache, v_cache, block_tables, q_starts, q_lens, positions0, dtype=torch.float64):
    """{first row: [n, heads, d]} per chunk: its context gathered through the block table,
    an explicit causal mask by position, softmax, all in `dtype`."""
    block_size, group = k_cache.shape[2], q.shape[1] // k_cache.shape[1]
    result = {}
    for table, row, n, start in zip(block_tables.tolist(), q_starts.tolist(), q_lens.tolist(), positions0.tolist()):
        pos = torch.arange(start + n, device=q.device)
        blocks = torch.tensor(table, device=q.device)[pos // block_size]
        k = k_cache[blocks, :, pos % block_size].to(dtype).repeat_interleave(group, 1)   # [ctx, heads, d]
        v = v_cache[blocks, :, pos % block_size].to(dtype).repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[row:row + n].to(dtype), k) / math.sqrt(q.shape[-1])
        causal = pos[None, :] <= (start + torch.arange(n, device=q.device))[:, None]   # [n, ctx]
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        result[row] = torch.einsum("hqk,khd->qhd", probs, v)
    return result


def check_prefill(inputs, untouched, tol, **config):
    """paged_prefill into a NaN-poisoned buffer: chunk rows match the reference, every one
    written; the other rows keep the poison."""
    paged_prefill = _kernels("triton_prefill").paged_prefill
    out = torch.full_like(inputs["q"], float("nan"))
    # max_q_len is a bound (as from a plan's token budget): the grid's extra tiles do nothing.
    got = paged_prefill(**inputs, out=out, max_q_len=int(inputs["q_lens"].max()) + 17, **config)
    assert got is out
    ref_dtype = torch.float64 if out.device.type == "cpu" else torch.float32
    for row, ref in reference_prefill(**inputs, dtype=ref_dtype).items():
        chunk = out[row:row + ref.shape[0]].to(ref.dtype)
        assert torch.isfinite(chunk).all(), f"rows of the chunk at {row} not written"
        err = ((chunk - ref).norm() / ref.norm()).item()
        assert err < tol, (row, err)
    assert torch.isnan(out[untouched]).all(), "a row outside the chunks was written"


# (chunks as (start position, length), block size, kv heads, group, block_m, block_n): fresh
# prompts (start 0) and continuations at unaligned starts, so tiles straddle key tiles and
# blocks; a one-token chunk; BLOCK_N below, equal to and above the block size (a key tile
# inside one block: one table entry; spanning blocks: one per token).
CASES = {
    "bs1-mha": ([(0, 20), (7, 5), (33, 2)], 1, 2, 1, 16, 16),
    "bs4-gqa3": ([(0, 37), (50, 17), (3, 1)], 4, 1, 3, 16, 16),
    "bs16-gqa4-tile-in-block": ([(0, 19), (30, 12)], 16, 1, 4, 16, 16),
    "bs16-gqa4-tile-spans-blocks": ([(5, 30), (0, 3), (40, 9)], 16, 2, 4, 32, 32),
    "bs4-bm-above-bn": ([(0, 33), (18, 40)], 4, 1, 1, 32, 16),
}


@pytest.mark.parametrize("case", CASES)
def test_paged_prefill_matches_reference(case):
    chunks, block_size, kv_heads, group, block_m, block_n = CASES[case]
    inputs, untouched = random_prefill_batch(chunks, block_size, kv_heads * group, kv_heads, d=16,
                                             seed=len(chunks) + block_size)
    check_prefill(inputs, untouched, 1e-5, block_m=block_m, block_n=block_n)


def test_paged_prefill_default_tiles():
    """The default 64 x 64 tiles at head_dim 64: several unmasked key tiles before the diagonal."""
    inputs, untouched = random_prefill_batch([(0, 130), (200, 70), (64, 64)], 16, 4, 2, d=64, seed=3)
    check_prefill(inputs, untouched, 1e-5)


@pytest.mark.parametrize("dtype", [
    # The interpreter keeps bfloat16 as its uint16 bits and tl.dot multiplies those
    # (unsupported there: triton-lang/triton#11584); test_gpu.py runs bfloat16 on a GPU.
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(INTERPRETED, reason="no bfloat16 tl.dot in the interpreter")),
    torch.float16])
def test_paged_prefill_half_precision(dtype):
    """Half-precision inputs: P is cast to V's dtype for the second dot, the output to q's."""
    inputs, untouched = random_prefill_batch([(0, 17), (9, 8)], 4, 4, 2, d=32, dtype=dtype)
    check_prefill(inputs, untouched, 2e-2, block_m=16, block_n=16)


@pytest.mark.parametrize("block_size, splits, lens", [(1, 1, [1, 17, 40]), (4, 3, [1, 17, 40]),
                                                      (16, 2, [33, 5]), (16, 4, [70])])
def test_paged_decode_matches_reference(block_size, splits, lens):
    """triton_paged.paged_decode (GPU-tested in test_gpu.py) under the same CPU coverage:
    one query per request at its last position, split contexts merged by log-sum-exp
    (including splits with no key, with more splits than a short context has tiles)."""
    paged_decode = _kernels("triton_paged").paged_decode
    heads, kv_heads = 6, 2
    inputs, _ = random_prefill_batch([(n - 1, 1) for n in lens], block_size, heads, kv_heads, d=16, seed=block_size)
    q = inputs["q"][inputs["q_starts"].long()]
    context_lens = inputs["positions0"] + 1
    out = paged_decode(q, inputs["k_cache"], inputs["v_cache"], inputs["block_tables"], context_lens,
                       block_n=16, num_splits=splits, max_context=max(lens))
    ref = reference_prefill(**{**inputs, "q": q, "q_starts": torch.arange(len(lens), dtype=torch.int32)})
    for i, want in ref.items():
        err = ((out[i].double() - want[0]).norm() / want[0].norm()).item()
        assert err < 1e-5, (i, err)


def _reference_cached(inputs, cached, q):
    """attention/reference.py's attend_cached (q-first) over the same cache and block tables:
    one decode row per request at position `cached[i]`."""
    from megatron_lamina.attention.kv_cache import PagedKVCache
    from megatron_lamina.attention.reference import ReferenceAttention
    from megatron_lamina.host_to_device import to_device
    from megatron_lamina.plan import SequenceChunk

    num_blocks, kv_heads, block_size, d = inputs["k_cache"].shape
    cache = PagedKVCache(1, num_blocks, block_size, kv_heads, d, torch.float32)
    cache.k[0].copy_(inputs["k_cache"].cpu())
    cache.v[0].copy_(inputs["v_cache"].cpu())
    chunks = [SequenceChunk(i, 0, n, [0], [], True, block_table=table)
              for i, (n, table) in enumerate(zip(cached, inputs["block_tables"].tolist()))]
    attend = ReferenceAttention(cache)
    [index] = to_device([attend.host_index(chunks)], torch.device("cpu"))
    return attend.attend_cached(0, index, q.cpu())


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")  # the interpreter's log(0) = -inf
@pytest.mark.parametrize("block_size, splits, cached", [(1, 1, [0, 17, 40]), (4, 3, [0, 17, 40]), (4, 3, [0]),
                                                        (16, 2, [33, 5]), (16, 4, [70, 0])])
def test_paged_decode_lse_matches_the_reference(block_size, splits, cached):
    """`return_lse` (q-first): the output (float32) and log-sum-exp over each request's cached
    keys equal the float32 reference's; a request with no cached key gives o 0 and lse -inf,
    with one split or several (every split empty: the merge kernel's guarded path)."""
    paged_decode = _kernels("triton_paged").paged_decode
    heads, kv_heads = 6, 2
    inputs, _ = random_prefill_batch([(n, 1) for n in cached], block_size, heads, kv_heads, d=16, seed=block_size)
    q = inputs["q"][inputs["q_starts"].long()]
    out, lse = paged_decode(q, inputs["k_cache"], inputs["v_cache"], inputs["block_tables"], inputs["positions0"],
                            block_n=16, num_splits=splits, max_context=max(cached), return_lse=True)
    assert out.dtype == lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    want = _reference_cached(inputs, cached, q)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(want.lse))
    empty = torch.isneginf(want.lse)
    assert torch.allclose(lse.cpu()[~empty], want.lse[~empty], atol=1e-5, rtol=0)
    assert torch.allclose(out.cpu(), want.out, atol=1e-5, rtol=0)
    assert not out[empty].any(), "no cached key: the partial output is 0"


def _fp8_scales(caches, storage, g):
    """An FP8 cache gets scales unlike 1 and unlike each other (per layer and KV head), the
    same in every cache, so that a kernel reading the wrong one, or none, is caught."""
    if storage is None:
        return
    scales = 0.5 + torch.rand(2, *caches[0].k_scale.shape, generator=g)
    for cache in caches:
        cache.k_scale.copy_(scales[0])
        cache.v_scale.copy_(scales[1])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors, float8 included (compared as bytes: torch has no float8 equality on CPU)."""
    return a.dtype == b.dtype and torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


STORAGE = [None, pytest.param(torch.float8_e4m3fn, id="fp8")]


@pytest.mark.parametrize("storage", STORAGE)
def test_paged_attention_q_first_matches_the_reference(storage):
    """attention/gpu.py's q-first path (attend_cached over context_lens - 1 with the kernel's
    own split count, then lse_merge's append_and_merge) against the reference's append and
    attend on the same cache, a request with no cached token included; with an FP8 cache
    too (the kernel dequantizes in registers, the reference in torch, the merge uses the
    new token's k, v as stored)."""
    _kernels("triton_paged")
    from megatron_lamina.attention.gpu import PagedAttention
    from megatron_lamina.attention.kv_cache import PagedKVCache
    from megatron_lamina.attention.reference import ReferenceAttention
    from megatron_lamina.host_to_device import to_device
    from megatron_lamina.plan import SequenceChunk

    g = torch.Generator().manual_seed(5)
    block_size, heads, kv_heads, d = 4, 6, 2, 16
    positions = [9, 0, 70, 3]
    order = torch.randperm(40, generator=g).tolist()
    chunks, used = [], 0
    for i, p in enumerate(positions):
        blocks = math.ceil((p + 1) / block_size)
        chunks.append(SequenceChunk(i, 0, p, [0], [], True, block_table=order[used:used + blocks]))
        used += blocks
    # The kernels' cache on the device, the reference's on the CPU (it is the CPU backend).
    caches = [PagedKVCache(1, 40, block_size, kv_heads, d, torch.float32, device, storage) for device in (DEVICE, "cpu")]
    _fp8_scales(caches, storage, g)
    history = torch.randn(2, 40, kv_heads, block_size, d, generator=g)
    for cache in caches:
        cache.k[0].copy_(history[0])
        cache.v[0].copy_(history[1])
    q, k, v = (torch.randn(len(positions), h, d, generator=g) for h in (heads, kv_heads, kv_heads))
    gpu, ref = PagedAttention(caches[0]), ReferenceAttention(caches[1])
    [gpu_index] = to_device([gpu.host_index(chunks)], torch.device(DEVICE))
    [ref_index] = to_device([ref.host_index(chunks)], torch.device("cpu"))
    qd, kd, vd = (t.to(DEVICE) for t in (q, k, v))
    got = gpu.append_and_merge(0, gpu_index, gpu.attend_cached(0, gpu_index, qd), qd, kd, vd).cpu()
    want = ref(0, ref_index, q, k, v)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert _same_bits(caches[0].k[0], caches[1].k[0]) and _same_bits(caches[0].v[0], caches[1].v[0])


@pytest.mark.parametrize("storage", STORAGE)
def test_paged_attention_matches_the_reference_on_a_mixed_micro_batch(storage):
    """attention/gpu.py's PagedAttention (decode kernel for the decode rows, prefill kernel for
    the chunks, one host index copied to the device) against attention/reference.py on the same
    cache: decode rows and prefill chunks interleaved, every layer's new K/V written; with an
    FP8 cache too (per-layer, per-head scales)."""
    _kernels("triton_prefill")
    from megatron_lamina.attention.gpu import PagedAttention
    from megatron_lamina.attention.kv_cache import PagedKVCache
    from megatron_lamina.attention.reference import ReferenceAttention
    from megatron_lamina.host_to_device import to_device
    from megatron_lamina.plan import SequenceChunk

    g = torch.Generator().manual_seed(3)
    block_size, heads, kv_heads, d = 4, 6, 2, 16
    specs = [(9, 1), (0, 7), (13, 1), (5, 6), (0, 1), (2, 1)]  # (start, tokens): decode rows and chunks
    order = torch.randperm(40, generator=g).tolist()
    chunks, used = [], 0
    for i, (start, n) in enumerate(specs):
        blocks = math.ceil((start + n) / block_size)
        chunks.append(SequenceChunk(i, 0, start, [0] * n, [], True, block_table=order[used:used + blocks]))
        used += blocks
    # The kernels' cache on the device, the reference's on the CPU (it is the CPU backend).
    caches = [PagedKVCache(2, 40, block_size, kv_heads, d, torch.float32, device, storage) for device in (DEVICE, "cpu")]
    _fp8_scales(caches, storage, g)
    for layer in range(2):
        history = torch.randn(2, 40, kv_heads, block_size, d, generator=g)
        for cache in caches:
            cache.k[layer].copy_(history[0])
            cache.v[layer].copy_(history[1])
    rows = sum(n for _, n in specs)
    outs = []
    for cache, backend in zip(caches, (PagedAttention, ReferenceAttention)):
        attend, device = backend(cache), cache.k[0].device
        [index] = to_device([attend.host_index(chunks)], device)
        g.manual_seed(4)
        layer_outs = []
        for layer in range(2):
            q, k, v = (torch.randn(rows, h, d, generator=g).to(device) for h in (heads, kv_heads, kv_heads))
            layer_outs.append(attend(layer, index, q, k, v).cpu())
        outs.append(torch.stack(layer_outs))
    got, want = outs
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    for layer in range(2):
        assert _same_bits(caches[0].k[layer], caches[1].k[layer])
        assert _same_bits(caches[0].v[layer], caches[1].v[layer])
