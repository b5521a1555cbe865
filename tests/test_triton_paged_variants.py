"""Every variant of the Triton paged decode kernel (attention/triton_paged.py's `fp8_dots`,
"q" and "fp16", the tile sizes, the split counts) equals attention/reference.py on the same
cache, on CPU through Triton's interpreter: float32, float16 and e4m3 caches (scales per KV
head unlike 1), GQA groups, block sizes 4, 16 and 32 under and over the tile, contexts that
are not a multiple of the tile, one split or several. (Warps and stages change only the
compiled code, which the interpreter does not run: test_triton_compile.py compiles them.)

Every cache slot a request must not read (past its context in its last block, and the
block its table is padded with) holds NaN: a variant that reads a key it should not, or
masks one it should, puts NaN or a wrong value in the output. bfloat16 dots do not run in
the interpreter (test_triton_prefill.py says why), so a bfloat16 q is tested here only with
float16 dots; test_gpu.py runs the variants in bfloat16 on a GPU, and
test_triton_compile.py compiles them for sm_90.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from test_triton_prefill import _kernels  # noqa: E402  (the interpreter check)

from megatron_lamina.attention.kv_cache import PagedKVCache  # noqa: E402
from megatron_lamina.attention.reference import ReferenceAttention  # noqa: E402
from megatron_lamina.fp8 import FP8  # noqa: E402
from megatron_lamina.host_to_device import to_device  # noqa: E402
from megatron_lamina.plan import SequenceChunk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = 16


def decode_case(lens, block_size, kv_heads, group, kv, seed):
    """A cache of `kv` ("float32", "float16" or "e4m3") holding one request per context
    length of `lens` (shuffled blocks, each table padded by a column naming a poison
    block), NaN in every slot no request may read. Returns (cache, block tables, chunks)."""
    g = torch.Generator().manual_seed(seed)
    blocks = [math.ceil((n + 1) / block_size) for n in lens]  # + the decode token's slot
    num_blocks = sum(blocks) + 1
    poison = num_blocks - 1
    storage = {"float32": torch.float32, "float16": torch.float16, "e4m3": FP8}[kv]
    model_dtype = torch.float32 if kv == "e4m3" else storage
    cache = PagedKVCache(1, num_blocks, block_size, kv_heads, D, model_dtype, "cpu", storage)
    if kv == "e4m3":  # unlike 1 and per head: a kernel that reads the wrong scale, or none, is caught
        cache.k_scale.copy_(0.5 + torch.rand(cache.k_scale.shape, generator=g))
        cache.v_scale.copy_(0.5 + torch.rand(cache.v_scale.shape, generator=g))
    order = torch.randperm(num_blocks - 1, generator=g).tolist()
    values = torch.randn(2, num_blocks, kv_heads, block_size, D, generator=g) * 2
    values[:, poison] = float("nan")
    tables, chunks, used = [], [], 0
    for i, (n, nb) in enumerate(zip(lens, blocks)):
        table = order[used:used + nb]
        used += nb
        for pos in range(n, nb * block_size):  # past the context: never read
            values[:, table[pos // block_size], :, pos % block_size] = float("nan")
        tables.append(table + [poison] * (max(blocks) + 1 - nb))
        chunks.append(SequenceChunk(i, 0, n, [0], [], True, block_table=table))
    cache.k[0].copy_(values[0])
    cache.v[0].copy_(values[1])
    return cache, torch.tensor(tables, dtype=torch.int32), chunks


def reference(cache, chunks, q):
    """attention/reference.py's attend_cached: each request's query over its whole context,
    float32, the cache dequantized in torch."""
    attend = ReferenceAttention(cache)
    [index] = to_device([attend.host_index(chunks)], torch.device("cpu"))
    return attend.attend_cached(0, index, q.float()).out


def check_variant(lens, block_size, kv_heads, group, kv, q_dtype, tol, seed=0, q_range=1.0, **variant):
    paged_decode = _kernels("triton_paged").paged_decode
    cache, tables, chunks = decode_case(lens, block_size, kv_heads, group, kv, seed)
    cache.k_scale /= q_range  # the scores stay of order 1 whatever q's range
    q = (torch.randn(len(lens), kv_heads * group, D, generator=torch.Generator().manual_seed(seed + 1))
         * q_range).to(q_dtype)
    scales = {"k_scale": cache.k_scale[0].to(DEVICE), "v_scale": cache.v_scale[0].to(DEVICE)} if kv == "e4m3" else {}
    got = paged_decode(q.to(DEVICE), cache.k[0].to(DEVICE), cache.v[0].to(DEVICE), tables.to(DEVICE),
                       torch.tensor(lens, dtype=torch.int32, device=DEVICE), max_context=max(lens), **scales,
                       **variant)
    assert got.dtype == q_dtype
    want = reference(cache, chunks, q)
    got = got.cpu().float()
    assert torch.isfinite(got).all(), "a key past a context was read"
    for i in range(len(lens)):
        err = ((got[i] - want[i]).norm() / want[i].norm()).item()
        assert err < tol, (i, lens[i], err)


# (context lengths, block size, kv heads, group, BLOCK_N, splits): block sizes under the tile
# (a tile spans blocks: an entry per token) and over it (one entry), GQA
# groups of 1, 3 and 4, contexts a tile and not, a context of one key, splits some of which
# hold only a partial tile or nothing.
CASES = {
    "bs16-tile64-gqa4": ([1, 64, 100, 130], 16, 2, 4, 64, 1),
    "bs32-tile64-gqa3-splits3": ([5, 64, 97, 200], 32, 1, 3, 64, 3),
    "bs16-tile32-mha-splits2": ([33, 16, 90], 16, 2, 1, 32, 2),
    "bs32-tile16-gqa4-splits4": ([70, 15], 32, 1, 4, 16, 4),
    "bs4-tile16-gqa3": ([17, 40, 3], 4, 2, 3, 16, 1),
}
# (cache, q dtype, tolerance, settings): float32 dots are exact ("ieee") in the interpreter,
# float16 rounds q, the tiles and the probabilities to 11 bits. An e4m3 cache's dots run here
# in q's float32 (exact; the default for a float32 q, named so); the float16 dots a 16-bit q
# gets by default are test_fp16_dots_over_e4m3's.
KV_TYPES = {"float32": ("float32", torch.float32, 1e-5, {}), "float16": ("float16", torch.float16, 5e-3, {}),
            "e4m3": ("e4m3", torch.float32, 1e-5, {"fp8_dots": "q"})}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kv_type", KV_TYPES)
def test_decode_variant_matches_the_reference(kv_type, case):
    lens, block_size, kv_heads, group, block_n, splits = CASES[case]
    kv, q_dtype, tol, settings = KV_TYPES[kv_type]
    check_variant(lens, block_size, kv_heads, group, kv, q_dtype, tol, seed=block_size + block_n,
                  block_n=block_n, num_splits=splits, **settings)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp16_dots_over_e4m3_match_the_reference(q_dtype, case):
    """`fp8_dots="fp16"`: q cast to float16 once, e4m3 tiles converted to float16, for q of
    every type the engine passes."""
    lens, block_size, kv_heads, group, block_n, splits = CASES[case]
    check_variant(lens, block_size, kv_heads, group, "e4m3", q_dtype, 5e-3, seed=block_size + block_n,
                  block_n=block_n, num_splits=splits, fp8_dots="fp16")


def test_waves_split_the_context_as_the_sweep_does():
    """Without `num_splits`, `waves` sets the split count (bench/fp8_speed.py's "splits" axis):
    here five splits of a tile each, the last two contexts' tails in partial tiles."""
    triton_paged = _kernels("triton_paged")
    assert triton_paged.split_count(2, 2, 70, 16, 8.0, torch.device(DEVICE)) == 5
    check_variant([40, 70], 16, 2, 4, "e4m3", torch.float32, 1e-5, block_n=16, waves=8.0, fp8_dots="q")


@pytest.mark.parametrize("q_range", [1e5, 1e20])
def test_fp16_dots_keep_q_past_the_float16_range(q_range):
    """A q past float16's 65504 (where a plain cast is inf and the output NaN) is brought into
    range by a power of two that the score scale takes back: the same attention (K's scale
    is 1/q_range, so that the scores are of order 1 and the comparison is meaningful)."""
    check_variant([40, 70], 16, 2, 4, "e4m3", torch.float32, 5e-3, q_range=q_range, block_n=32,
                  num_splits=2, fp8_dots="fp16")


@pytest.mark.parametrize("setting, message", [({"fp8_dots": "bf16"}, "fp8_dots='bf16'; allowed: q, fp16")])
def test_a_variant_setting_names_its_choices(setting, message):
    paged_decode = _kernels("triton_paged").paged_decode
    cache, tables, _ = decode_case([5], 16, 1, 1, "e4m3", 0)
    with pytest.raises(ValueError, match=message):
        paged_decode(torch.zeros(1, 1, D), cache.k[0], cache.v[0], tables, torch.tensor([5], dtype=torch.int32),
                     k_scale=cache.k_scale[0], v_scale=cache.v_scale[0], **setting)
