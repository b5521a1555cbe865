"""The CUDA code paths (run on a GPU machine; skipped where there is none, e.g. in CI).

The Triton paged decode kernel against a float32 reference over mixed lengths, block sizes
and context splits (and its log-sum-exp with q-first's merge), and the Triton paged prefill
kernel at a model's shape; the engine on CUDA, colocated and disaggregated (two ranks
sharing one GPU over gloo with host staging, or NCCL across two GPUs; q-first too), eager
and with CUDA graphs
(colocated whole-step graphs; disaggregated stage graphs; TP 2 with NCCL captured where
there are 2 or 4 GPUs), against `transformers` exactly as the CPU layout tests do; and
flex_attention's compiled kernel over the paged pool.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import REQUESTS
from layout_job import generate_on_ranks
from spawn_ranks import run_ranks
from tiny_models import reference_generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("block_size, splits", [(16, None), (64, 3), (256, 1), (16, 5)])
def test_paged_decode_matches_reference(block_size, splits):
    from megatron_lamina.attention.triton_paged import paged_decode

    g = torch.Generator(device="cuda").manual_seed(block_size)
    heads, kv_heads, d, batch = 32, 8, 128, 9
    lens = torch.randint(1, 2500, (batch,), device="cuda", generator=g).int()
    blocks = [math.ceil(int(n) / block_size) for n in lens]
    kc = torch.randn(sum(blocks) + 3, kv_heads, block_size, d, dtype=torch.bfloat16, device="cuda", generator=g)
    vc = torch.randn_like(kc)
    order = torch.randperm(kc.shape[0], device="cuda", generator=g)
    tables = torch.zeros(batch, max(blocks), dtype=torch.int32, device="cuda")
    used = 0
    for i, nb in enumerate(blocks):
        tables[i, :nb] = order[used:used + nb]
        used += nb
    q = torch.randn(batch, heads, d, dtype=torch.bfloat16, device="cuda", generator=g)
    out = paged_decode(q, kc, vc, tables, lens, num_splits=splits)
    for i, n in enumerate(lens.tolist()):
        slots = (tables[i].long()[torch.arange(n, device="cuda") // block_size] * block_size
                 + torch.arange(n, device="cuda") % block_size)
        k = kc[slots // block_size, :, slots % block_size].float().repeat_interleave(heads // kv_heads, 1)
        v = vc[slots // block_size, :, slots % block_size].float().repeat_interleave(heads // kv_heads, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].float(), k) / math.sqrt(d), -1)
        ref = torch.einsum("hn,nhd->hd", p, v)
        assert ((out[i].float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("splits", [None, 1, 4])
def test_paged_decode_lse_matches_reference(splits):
    """q-first's `return_lse` at a model's shape in bfloat16: the float32 partial output and the
    log-sum-exp over each request's cached keys (one request with none: o 0, lse -inf), then
    lse_merge's merge of the new token against attention over the whole context."""
    from megatron_lamina.attention.lse_merge import CachedPartial, merge_new_token
    from megatron_lamina.attention.triton_paged import paged_decode

    g = torch.Generator(device="cuda").manual_seed(7)
    heads, kv_heads, d, block_size = 32, 8, 128, 16
    cached = [0, 1, 15, 16, 700, 2400]
    blocks = [math.ceil((n + 1) / block_size) for n in cached]
    kc = torch.randn(sum(blocks) + 3, kv_heads, block_size, d, dtype=torch.bfloat16, device="cuda", generator=g)
    vc = torch.randn_like(kc)
    order = torch.randperm(kc.shape[0], device="cuda", generator=g)
    tables = torch.zeros(len(cached), max(blocks), dtype=torch.int32, device="cuda")
    used = 0
    for i, nb in enumerate(blocks):
        tables[i, :nb] = order[used:used + nb]
        used += nb
    q = torch.randn(len(cached), heads, d, dtype=torch.bfloat16, device="cuda", generator=g)
    lens = torch.tensor(cached, dtype=torch.int64, device="cuda")
    out, lse = paged_decode(q, kc, vc, tables, lens, num_splits=splits, max_context=max(cached), return_lse=True)
    assert out.dtype == lse.dtype == torch.float32
    for i, n in enumerate(cached):  # request i: keys 0..n-1 cached, the new token at position n
        pos = torch.arange(n + 1, device="cuda")
        slots = tables[i].long()[pos // block_size] * block_size + pos % block_size
        k = kc[slots // block_size, :, slots % block_size].float().repeat_interleave(heads // kv_heads, 1)
        v = vc[slots // block_size, :, slots % block_size].float().repeat_interleave(heads // kv_heads, 1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), k) / math.sqrt(d)
        if n == 0:
            assert torch.isneginf(lse[i]).all() and not out[i].any()
        else:
            want_lse = torch.logsumexp(scores[:, :n], -1)
            assert torch.allclose(lse[i], want_lse, atol=2e-3, rtol=0), (lse[i] - want_lse).abs().max()
            want = torch.einsum("hn,nhd->hd", torch.softmax(scores[:, :n], -1), v[:n])
            assert ((out[i] - want).norm() / want.norm()).item() < 1e-2
        whole = torch.einsum("hn,nhd->hd", torch.softmax(scores, -1), v)
        new = (slots[-1] // block_size, slice(None), slots[-1] % block_size)
        got = merge_new_token(CachedPartial(out[i:i + 1], lse[i:i + 1]), q[i:i + 1], kc[new][None], vc[new][None])[0]
        assert ((got - whole).norm() / whole.norm()).item() < 1e-2, (i, n)


def test_paged_prefill_matches_reference():
    """Every prefill chunk of a micro-batch in one launch, bfloat16, at a model's shape: a fresh
    1000-token prompt, a continuation at 1024 and a short one at 5, decode rows in between
    left untouched (test_triton_prefill.py has the small exact cases)."""
    from test_triton_prefill import check_prefill, random_prefill_batch

    inputs, untouched = random_prefill_batch([(0, 1000), (1024, 512), (5, 37)], 16, heads=32, kv_heads=8,
                                             d=128, dtype=torch.bfloat16)
    check_prefill(inputs, untouched, 2e-2)


@pytest.mark.parametrize("block_size", [16, 64])
def test_compiled_flex_paged_decode_matches_reference(block_size):
    """flex_attention's fused kernel (block sparsity + mask) over the paged pool."""
    from test_flex_paged import flex_over, random_decode_batch
    from torch.nn.attention.flex_attention import flex_attention

    from megatron_lamina.attention.reference import attend_chunks

    lens = [1, 5, 16, 17, 40, 333, 1000, 64]
    cache, chunks, q, kv = random_decode_batch(lens, block_size, heads=32, kv_heads=8, d=128)
    ref = attend_chunks(cache, 0, chunks, q, kv, kv)
    out = flex_over(cache, chunks, q, attend=torch.compile(flex_attention), device="cuda", dtype=torch.bfloat16)
    assert ((out.float().cpu() - ref).norm() / ref.norm()).item() < 1e-2


GPU_LAYOUTS = {  # (tensor_parallel, attention_workers, transport, CUDA graphs[, more overrides])
    "colocated-cuda-graphs": (1, 0, "auto", True),
    # The cache sized by the worker factory after the graphs (memory.py), the synchronous loop.
    "colocated-graphs-auto-kv-sync": (1, 0, "auto", True, ["kv_cache.num_blocks=auto",
                                                          "kv_cache.memory_fraction=0.2",
                                                          "scheduler.async_scheduling=false"]),
    "colocated-eager": (1, 0, "auto", False),
    "disaggregated-shared-gpu": (1, 1, "gloo", False),
    # Two ranks on one GPU size their caches from an even split of the fraction (memory.py).
    "disaggregated-shared-gpu-auto-kv": (1, 1, "gloo", True, ["kv_cache.num_blocks=auto",
                                                             "kv_cache.memory_fraction=0.3"]),
    # The model worker's stages replayed from CUDA graphs (StageGraphs), transport in between.
    "disaggregated-stage-graphs": (1, 1, "gloo", True),
    # q-first: the decode kernel over the cached tokens with its log-sum-exp, then the merge.
    "disaggregated-q-first": (1, 1, "gloo", True, ["runtime.q_first=true"]),
}
if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
    GPU_LAYOUTS["disaggregated-nccl"] = (1, 1, "nccl", True)
    GPU_LAYOUTS["disaggregated-nccl-eager"] = (1, 1, "nccl", False)
    GPU_LAYOUTS["disaggregated-nccl-q-first"] = (1, 1, "nccl", True, ["runtime.q_first=true"])
    # TP 2: the graphs hold the TP all-reduces (NCCL captured).
    GPU_LAYOUTS["colocated-tp2-cuda-graphs"] = (2, 0, "auto", True)
if torch.cuda.is_available() and torch.cuda.device_count() >= 4:
    GPU_LAYOUTS["disaggregated-tp2-stage-graphs"] = (2, 2, "nccl", True)


_REFERENCES: dict = {}


def _cuda_reference(model):
    """transformers' tokens and logits, sampled as the engine samples on a GPU (CUDA
    generators seeded like the engine's), once per model."""
    if model.hf_dir not in _REFERENCES:
        _REFERENCES[model.hf_dir] = reference_generate(model.hf_dir, *zip(*REQUESTS), device="cuda")
    return _REFERENCES[model.hf_dir]


@pytest.mark.parametrize("layout", GPU_LAYOUTS)
def test_engine_on_cuda_matches_transformers(layout, tiny_models):
    tp, workers, transport, graphs, *more = GPU_LAYOUTS[layout]
    runs = [(model, mb) for model in tiny_models.values() for mb in (1, 2)]
    cases = [(str(model.canonical_dir), [
        "runtime.device=cuda", f"runtime.transport={transport}", f"runtime.cuda_graphs={str(graphs).lower()}",
        f"parallel.tensor_parallel={tp}",
        f"parallel.attention_workers={workers}", f"scheduler.micro_batches={mb}", "kv_cache.block_size=4",
        "kv_cache.num_blocks=64", "scheduler.max_prefill_tokens=8", *(more[0] if more else [])])
        for model, mb in runs]
    results = run_ranks(generate_on_ranks, tp + workers, cases, REQUESTS)
    assert len(results) == len(cases)
    for (model, mb), result in zip(runs, results):
        tokens, logits = _cuda_reference(model)
        assert result["tokens"] == tokens
        for got, want in zip(result["logits"], logits):
            assert torch.allclose(got.cpu(), want, atol=1e-3, rtol=0), (got.cpu() - want).abs().max()
        # Every step replayed graphs (DecodeGraphs: colocated decode steps of one micro-batch;
        # StageGraphs: every other step, prefill chunks included, all buckets captured at
        # start-up), and none without runtime.cuda_graphs.
        if not graphs:
            assert result["graph_steps"] == 0, (mb, result["graph_steps"])
        else:
            assert result["graph_steps"] == result["steps"], (mb, result["graph_steps"], result["steps"])


def test_sample_tokens_on_cuda():
    """The batched sampler on CUDA logits with CUDA generators: greedy rows are the argmax,
    seeded rows repeat with the same seed and do not depend on their batch-mates, cuts hold,
    and draws follow the softmax."""
    from megatron_lamina.driver.sampling import sample_tokens
    from megatron_lamina.requests.sampling_params import SamplingParams

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(7, 32000, device="cuda", generator=g) * 3).bfloat16()
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=5),
        SamplingParams(temperature=0, top_k=3),
        SamplingParams(temperature=1.0, seed=6),
        SamplingParams(temperature=1.0, top_p=0.5, seed=7),
        SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=8),
        SamplingParams(temperature=1.5, top_k=2, seed=9),
    ]

    def draw(rows: list[int], steps: int = 5) -> list[list[int]]:
        generators = [params[i].make_generator("cuda") for i in rows]
        assert all(gen.device.type == "cuda" for gen in generators if gen is not None)  # None: unseeded
        return [sample_tokens(logits[rows], [params[i] for i in rows], generators) for _ in range(steps)]

    everyone = list(range(len(params)))
    first = draw(everyone)
    assert draw(everyone) == first
    argmax = logits.float().argmax(-1).tolist()
    top40 = logits.float().topk(40, dim=-1).indices.tolist()
    top2 = logits.float().topk(2, dim=-1).indices.tolist()
    for step in first:
        assert step[0] == argmax[0] and step[2] == argmax[2]
        assert step[1] in top40[1] and step[5] in top40[5] and step[6] in top2[6]
    assert len({step[3] for step in first}) > 1
    alone = draw([1])
    assert [step[1] for step in first] == [step[0] for step in alone]
    assert [step[1] for step in draw([4, 1, 0])] == [step[0] for step in alone]

    small = torch.tensor([[1.0, 3.0, 2.5, -1.0, 0.0, 2.9]], device="cuda")
    p = SamplingParams(temperature=1.0, seed=3)
    generator = p.make_generator("cuda")
    tokens = torch.tensor([sample_tokens(small, [p], [generator])[0] for _ in range(4000)])
    frequencies = torch.bincount(tokens, minlength=6).float() / 4000
    assert torch.allclose(frequencies, torch.softmax(small[0].cpu(), -1), atol=0.03)


def test_sampler_returns_before_the_gpu_work_ahead_of_it_finishes():
    """No sampling option makes the host wait for the GPU (issue 24): with a long kernel queued
    ahead, a batch mixing greedy rows, grouped temperature/top-k/top-p/min-p rows, a seeded row
    and a row with penalties and logit bias is enqueued and the sampler returns while that
    kernel still runs (its event not yet complete); the tokens then come out as sampled alone."""
    from megatron_lamina.driver.sampling import sample_tokens_on_device
    from megatron_lamina.requests.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.95),
              SamplingParams(temperature=1.0, top_p=0.95), SamplingParams(temperature=0.7, top_k=40, min_p=0.05),
              SamplingParams(temperature=1.0, seed=7),
              SamplingParams(temperature=0.8, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2,
                             logit_bias={5: 3.0, 9: -100.0})]
    history = [None] * 5 + [([1, 2, 3], [4, 5, 4])]
    logits = torch.randn(len(params), 32000, device="cuda")
    sample_tokens_on_device(logits, params, [p.make_generator("cuda") for p in params], history)  # warm-up
    torch.cuda.synchronize()
    generators = [p.make_generator("cuda") for p in params]
    torch.cuda._sleep(3_000_000_000)  # about 2 s of one spinning kernel
    ahead = torch.cuda.Event()
    ahead.record()
    torch.cuda.set_sync_debug_mode("error")  # a synchronizing call raises where it is made
    try:
        tokens = sample_tokens_on_device(logits, params, generators, history)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not ahead.query(), "the sampler waited for the kernel ahead of it"
    assert tokens.shape == (len(params),)
    seeded = sample_tokens_on_device(logits[4:5], params[4:5], [params[4].make_generator("cuda")], history[4:5])
    assert int(tokens[4]) == int(seeded[0]) and int(tokens[0]) == int(logits[0].argmax())


@pytest.mark.parametrize("layout", ["colocated-cuda-graphs", "disaggregated-stage-graphs"])
def test_prefix_cache_survives_graph_replays(layout, tiny_models):
    """Requests sharing prefixes (tests/test_prefix_cache_layouts.py) with the prefix cache off,
    on, and on with a one-request device cache and a host tier (pinned memory, copies on the
    rank's copy stream), every step replayed from CUDA graphs (whole-step decode graphs colocated,
    stage graphs disaggregated): the same tokens, logits within 1e-4, prompts served from the
    cache and from host memory."""
    from test_prefix_cache_layouts import COMMON, HOST_TIER, REQUESTS as SHARED

    tp, workers, transport, _ = GPU_LAYOUTS[layout][:4]
    checkpoint = str(tiny_models["untied"].canonical_dir)
    base = ["runtime.device=cuda", f"runtime.transport={transport}", "runtime.cuda_graphs=true",
            f"parallel.tensor_parallel={tp}", f"parallel.attention_workers={workers}", *COMMON]
    cases = [(checkpoint, base + [f"kv_cache.prefix_caching={on}"]) for on in ("false", "true")]
    cases.append((checkpoint, base + HOST_TIER))  # the device cache holds one request: hits from host memory
    off, on, host = run_ranks(generate_on_ranks, tp + workers, cases, SHARED)
    assert sum(on["cached_tokens"]) >= 4 * 8 and not any(off["cached_tokens"])
    assert host["prefix_stats"][2] >= 8  # tokens served from the host tier
    for run in (on, host):
        assert run["tokens"] == off["tokens"]
        for got, want in zip(run["logits"], off["logits"]):
            assert (got.cpu() - want.cpu()).abs().max() < 1e-4
        assert run["graph_steps"] == run["steps"]
    assert off["graph_steps"] == off["steps"]


def _apply_behind_a_long_kernel(tier, plan, then=lambda: None):
    """`tier.apply(plan)` with about a second of one spinning kernel queued ahead on the compute
    stream, under sync debug mode (a synchronizing call raises); asserts that it returned before
    that kernel and its copies finished (asked at once: nothing else queued yet), runs `then`
    (the step's own work after apply) in the same mode, waits for the device, returns `then`'s."""
    torch.cuda._sleep(2_000_000_000)
    ahead = torch.cuda.Event()
    ahead.record()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tier.apply(plan)
        returned_early = not ahead.query() and not tier.copies.query()
        result = then()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert returned_early, "apply waited for the step ahead or its copies"
    torch.cuda.synchronize()
    return result


def _assert_offloaded(tier, offloads, blocks):
    """Each (device block, host slot) of `offloads` holds the block's bytes of `blocks` (every layer's, before the step)."""
    for block, slot in offloads:
        assert torch.equal(tier.slots[slot], torch.stack([layer[block] for layer in blocks]).cpu()), (block, slot)


def test_prefix_cache_host_tier_copies_run_beside_the_step():
    """The host tier's copies (issue 25: the copy engine, not the step, pays for them): with a
    long kernel queued on the compute stream, a step's offloads and loads are issued and
    `apply` returns with no synchronizing call (sync debug mode raises on one) while they still
    wait on the rank's copy stream. A block offloaded and overwritten by the compute stream
    right after (as a step refilling it would) reaches its slot with its old bytes, a block
    that is both offloaded and loaded goes out before it is refilled, the compute stream reads
    a loaded block's new bytes, and another shard's copies are not this rank's. (The engine's
    tokens with a host tier equal those without: test_prefix_cache_survives_graph_replays.)"""
    from megatron_lamina.attention.kv_cache import PagedKVCache
    from megatron_lamina.plan import StepPlan
    from megatron_lamina.worker.host_tier import HostTier

    cache = PagedKVCache(4, 64, 16, 2, 64, torch.bfloat16, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    tier = HostTier(cache, 32, shard=0)
    offloads = [(3, 5), (4, 6), (10, 20), (11, 7)]   # (device block, host slot); 5, 6, 7: one run
    loads = [(30, 0), (31, 1), (3, 9)]                # block 3 goes out to slot 5, then takes slot 9's bytes
    plan = StepPlan(offloads=[x for b, s in offloads for x in (0, b, s)] + [1, 50, 2],
                    loads=[x for b, s in loads for x in (0, b, s)] + [1, 51, 3])

    def fill():
        torch.cuda.synchronize()  # no copy of an earlier apply still writes the slots
        for layer in tier.layers:
            layer.copy_(torch.randint(0, 256, layer.shape, dtype=torch.uint8, device="cuda", generator=g))
        tier.slots.copy_(torch.randint(0, 256, tier.slots.shape, dtype=torch.uint8))
        torch.cuda.synchronize()
        return [layer.clone() for layer in tier.layers], tier.slots.clone()

    def step_after_apply():
        for layer in tier.layers:  # the step refills block 10, which went out
            layer[10].fill_(0)
        return torch.stack([layer[31] for layer in tier.layers])

    fill()
    tier.apply(plan)  # warm-up: the allocators' first buffers, and every kernel's first launch
    step_after_apply()  # (a kernel's first launch loads its module, which may wait for the device)
    blocks, slots = fill()
    read = _apply_behind_a_long_kernel(tier, plan, step_after_apply)
    _assert_offloaded(tier, offloads, blocks)
    for block, slot in loads:
        assert all(torch.equal(layer[block].cpu(), slots[slot, i]) for i, layer in enumerate(tier.layers)), block
    assert torch.equal(read.cpu(), slots[1]) and all(bool((layer[10] == 0).all()) for layer in tier.layers)
    untouched = [s for s in range(32) if s not in {slot for _, slot in offloads}]
    assert torch.equal(tier.slots[untouched], slots[untouched])
    assert all(torch.equal(layer[50], before[50]) for layer, before in zip(tier.layers, blocks))


def test_prefix_cache_host_tier_pins_exactly_its_size():
    """A 3 GiB host tier (issue 25; no power of two) is pinned at exactly its bytes, outside
    PyTorch's pinned allocator, whose stats show the rounding for a `pin_memory=True` tensor of
    an odd size (96 MiB + 1 takes 128 MiB) and nothing for the tier. Its copies, at both ends of
    the range, run on the copy stream behind a long kernel, `apply` returning before them with no
    synchronizing call (a copy from pages that were not locked would make the host wait), and
    land as planned. Pinning the same pages again is an error naming kv_cache.host_cache_gib
    (in a thread of its own: the runtime's last error is per thread); `close` unpins them."""
    import threading

    from megatron_lamina.attention.kv_cache import PagedKVCache
    from megatron_lamina.plan import StepPlan
    from megatron_lamina.worker.host_memory import GIB, pin
    from megatron_lamina.worker.host_tier import HostTier, host_blocks

    def allocator_bytes():  # the pinned allocator's blocks, rounded (a key of its old and new stats alike)
        return torch.cuda.host_memory_stats()["allocated_bytes.current"]

    cache = PagedKVCache(4, 64, 16, 2, 64, torch.bfloat16, "cuda")
    slots = host_blocks(3.0, PagedKVCache.bytes_per_block(4, 16, 2, 64, torch.bfloat16))
    before = allocator_bytes()
    tier = HostTier(cache, slots, shard=0)
    assert allocator_bytes() == before, "the tier went through PyTorch's pinned allocator"
    assert tier.nbytes == tier.pinned_bytes == 3 * GIB and tier.slots.is_pinned()
    control = torch.empty((96 << 20) + 1, dtype=torch.uint8, pin_memory=True)
    # (an odd size no earlier test pinned: a new block, not one from the allocator's cache)
    assert allocator_bytes() - before == 128 << 20, "pin_memory=True did not round up: this test sees no rounding"
    del control

    g = torch.Generator(device="cuda").manual_seed(1)
    ends = [0, slots // 2, slots - 2, slots - 1]
    offloads = [(3, slots - 1), (4, 0)]                    # (device block, host slot)
    loads = [(30, slots - 2), (31, slots // 2)]
    plan = StepPlan(offloads=[x for b, s in offloads for x in (0, b, s)],
                    loads=[x for b, s in loads for x in (0, b, s)])
    tier.apply(plan)  # warm-up: every kernel's first launch (which may wait for the device)
    torch.cuda.synchronize()
    for layer in tier.layers:
        layer.copy_(torch.randint(0, 256, layer.shape, dtype=torch.uint8, device="cuda", generator=g))
    tier.slots[ends] = torch.randint(0, 256, (4, *tier.slots.shape[1:]), dtype=torch.uint8)
    blocks, held = [layer.clone() for layer in tier.layers], tier.slots[ends].clone()
    torch.cuda.synchronize()
    _apply_behind_a_long_kernel(tier, plan)
    _assert_offloaded(tier, offloads, blocks)
    for block, slot in loads:
        want = held[ends.index(slot)]
        assert all(torch.equal(layer[block].cpu(), want[i]) for i, layer in enumerate(tier.layers)), block

    refused = []

    def pin_again():
        try:
            pin(tier.slots, cache.k[0].device)
        except RuntimeError as e:
            refused.append(str(e))

    again = threading.Thread(target=pin_again)
    again.start()
    again.join()
    assert refused and "kv_cache.host_cache_gib" in refused[0] and "cudaHostRegister" in refused[0], refused
    tier.close()
    assert not tier.slots.is_pinned()


def _fp8_pages(shape, g):
    """An e4m3 pool of `shape` with per-KV-head scales unlike 1, and its float32 dequantized copy."""
    scale = 0.02 + torch.rand(shape[1], device="cuda", generator=g) * 0.05
    pool = (torch.randn(shape, device="cuda", generator=g) * 0.1 / scale[:, None, None]).to(torch.float8_e4m3fn)
    return pool, scale, pool.float() * scale[:, None, None]


def test_fp8_kernels_match_float32_on_dequantized_pages():
    """The decode kernel (one split and several, with the log-sum-exp) and the prefill kernel
    reading an e4m3 cache with bfloat16 queries, against the same kernels in float32 (exact
    "ieee" dots) over the dequantized cache: e4m3 converts to bfloat16 exactly, so only
    bfloat16's rounding of q and the probabilities is left."""
    from megatron_lamina.attention.triton_paged import paged_decode
    from megatron_lamina.attention.triton_prefill import paged_prefill

    g = torch.Generator(device="cuda").manual_seed(26)
    heads, kv_heads, d, block_size, batch, blocks_each = 32, 8, 128, 16, 6, 64
    (kc, ks, kf), (vc, vs, vf) = (_fp8_pages((batch * blocks_each, kv_heads, block_size, d), g) for _ in range(2))
    tables = torch.randperm(batch * blocks_each, device="cuda", generator=g).view(batch, blocks_each).int()
    lens = torch.randint(1, blocks_each * block_size, (batch,), device="cuda", generator=g).int()
    q = torch.randn(batch, heads, d, device="cuda", generator=g)
    for splits in (1, 5):
        got, got_lse = paged_decode(q.bfloat16(), kc, vc, tables, lens, num_splits=splits, return_lse=True,
                                    k_scale=ks, v_scale=vs)
        want, want_lse = paged_decode(q, kf, vf, tables, lens, num_splits=splits, return_lse=True)
        assert ((got - want).norm() / want.norm()).item() < 1e-2, splits
        assert (got_lse - want_lse).abs().max().item() < 5e-2, splits
    rows = 300  # one prefill chunk per request: its last `rows // batch` positions
    n = rows // batch
    starts = (lens - n).clamp(min=0)
    q_rows = torch.randn(n * batch, heads, d, device="cuda", generator=g)
    q_starts = torch.arange(batch, device="cuda", dtype=torch.int32) * n
    q_lens = torch.minimum(lens, torch.full_like(lens, n))
    out = torch.zeros(n * batch, heads, d, device="cuda", dtype=torch.bfloat16)
    paged_prefill(q_rows.bfloat16(), kc, vc, tables, q_starts, q_lens, starts.int(), out, n, k_scale=ks, v_scale=vs)
    ref = torch.zeros(n * batch, heads, d, device="cuda")
    paged_prefill(q_rows, kf, vf, tables, q_starts, q_lens, starts.int(), ref, n)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


# paged_decode's variants (bench/fp8_speed.py's sweep; test_triton_paged_variants.py on CPU),
# several at tiles and launch settings the sweep tries.
DECODE_VARIANTS = {
    "default": {},
    "q-dots": {"fp8_dots": "q"},  # (float16 dots are the default)
    "128-w8": {"block_n": 128, "num_warps": 8},
    "fp16-dots-256-w8-s2": {"fp8_dots": "fp16", "block_n": 256, "num_warps": 8, "num_stages": 2},
    "fp16-dots-64-s5": {"fp8_dots": "fp16", "block_n": 64, "num_stages": 5},
    "s6": {"num_stages": 6},  # (at each cache's default tile: six of a bf16 tile of 128 would not fit)
    "waves-8": {"waves": 8.0},
}


@pytest.mark.parametrize("variant", DECODE_VARIANTS)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "e4m3"])
@pytest.mark.parametrize("block_size, splits", [(16, None), (32, 3)])
def test_paged_decode_variants_match_reference(block_size, splits, fp8, variant):
    """Each variant of the decode kernel, bf16 q over a bf16 or e4m3 cache (scales per KV head
    unlike 1), mixed lengths not a multiple of any tile, against float32 attention over the
    cache as stored (dequantized)."""
    from megatron_lamina.attention.triton_paged import paged_decode

    g = torch.Generator(device="cuda").manual_seed(block_size)
    heads, kv_heads, d, batch = 32, 8, 128, 9
    lens = torch.randint(1, 2500, (batch,), device="cuda", generator=g).int()
    blocks_each = math.ceil(int(lens.max()) / block_size)
    shape = (batch * blocks_each, kv_heads, block_size, d)
    if fp8:
        (kc, ks, kf), (vc, vs, vf) = (_fp8_pages(shape, g) for _ in range(2))
        scales = {"k_scale": ks, "v_scale": vs}
    else:
        kc, vc = (torch.randn(shape, dtype=torch.bfloat16, device="cuda", generator=g) for _ in range(2))
        (kf, vf), scales = (kc.float(), vc.float()), {}
    tables = torch.randperm(batch * blocks_each, device="cuda", generator=g).view(batch, blocks_each).int()
    q = torch.randn(batch, heads, d, dtype=torch.bfloat16, device="cuda", generator=g)
    out = paged_decode(q, kc, vc, tables, lens, num_splits=splits, **scales, **DECODE_VARIANTS[variant])
    for i, n in enumerate(lens.tolist()):
        pos = torch.arange(n, device="cuda")
        blocks = tables[i].long()[pos // block_size]
        k = kf[blocks, :, pos % block_size].repeat_interleave(heads // kv_heads, 1)
        v = vf[blocks, :, pos % block_size].repeat_interleave(heads // kv_heads, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].float(), k) / math.sqrt(d), -1)
        ref = torch.einsum("hn,nhd->hd", p, v)
        assert ((out[i].float() - ref).norm() / ref.norm()).item() < 1e-2, (i, n)


FP8_GPU_ATOL = 0.6  # test_fp8_weights.py's bound for the same tiny models on a CPU


@pytest.mark.parametrize("layout", ["colocated-cuda-graphs", "disaggregated-stage-graphs"])
def test_fp8_kv_and_weights_on_cuda(layout, tiny_models, tmp_path):
    """FP8 KV (Triton kernels reading e4m3), then FP8 weights (torch._scaled_mm) and KV, every
    step replayed from CUDA graphs, with the asynchronous loop; disaggregated with q-first
    too: held to transformers as the CPU FP8 tests hold them (fp8_checks.py)."""
    from fp8_checks import check_fp8_run

    from megatron_lamina.checkpoint.convert import quantize_checkpoint

    tp, workers, transport, _ = GPU_LAYOUTS[layout][:4]
    model = tiny_models["untied"]
    fp8_dir = quantize_checkpoint(model.canonical_dir, tmp_path / "fp8")
    base = ["runtime.device=cuda", f"runtime.transport={transport}", "runtime.cuda_graphs=true",
            f"parallel.tensor_parallel={tp}", f"parallel.attention_workers={workers}", "kv_cache.block_size=4",
            "kv_cache.num_blocks=64", "scheduler.max_prefill_tokens=8", "kv_cache.dtype=fp8_e4m3"]
    cases = [(str(model.canonical_dir), base), (str(fp8_dir), base)]
    if workers:
        cases.append((str(fp8_dir), base + ["runtime.q_first=true"]))
    results = run_ranks(generate_on_ranks, tp + workers, cases, REQUESTS)
    tokens, logits = _cuda_reference(model)
    for (checkpoint, overrides), result in zip(cases, results):
        check_fp8_run(f"{checkpoint} {overrides[-1]}", result, tokens, logits, FP8_GPU_ATOL)
        assert result["graph_steps"] == result["steps"]


# The first step's logits of the tiny random spec (weights N(0, 0.02), |logit| <= 0.6), FP8
# weights quantized at load against the unquantized ones: at most 0.032 on a CPU (bfloat16 and
# float32, spec seeds 0-3, 2026-12-07); 0.1 leaves room for the GPU's own draws and rounding,
# while a weight read without its scale (e4m3 values up to 448 for weights near 0.06) is off by
# orders of magnitude.
FP8_AT_LOAD_ATOL = 0.1


def test_random_weights_drawn_at_load_on_cuda(tmp_path):
    """A spec whose weights are drawn at load (write_random_spec, the tiny shape), colocated in
    bf16 from CUDA graphs, its model built on the GPU (worker_factory.new_model): each start
    draws the same weights (a second start generates the same tokens), unquantized and with
    FP8 weights quantized at load (torch._scaled_mm); and the FP8 run's first-step logits are
    within FP8's rounding of the unquantized ones, and not equal to them."""
    from megatron_lamina.checkpoint.random_weights import write_random_spec

    spec = str(write_random_spec(tmp_path / "spec", "tiny", seed=5))
    base = ["runtime.device=cuda", "runtime.cuda_graphs=true", "model.dtype=bfloat16", "parallel.tensor_parallel=1",
            "parallel.attention_workers=0", "kv_cache.block_size=4", "kv_cache.num_blocks=64",
            "scheduler.max_prefill_tokens=8"]
    fp8 = [*base, "model.weight_dtype=fp8_e4m3"]
    first, again, fp8_first, fp8_again = run_ranks(generate_on_ranks, 1, [(spec, base), (spec, base), (spec, fp8),
                                                                          (spec, fp8)], REQUESTS)
    assert [len(t) for t in first["tokens"]] == [params.max_tokens for _, params in REQUESTS]
    assert again["tokens"] == first["tokens"] and fp8_again["tokens"] == fp8_first["tokens"]
    assert first["graph_steps"] == first["steps"] and fp8_first["graph_steps"] == fp8_first["steps"]
    for mine, unquantized in zip(fp8_first["logits"], first["logits"]):
        assert not torch.equal(mine[0], unquantized[0])
        assert (mine[0].float() - unquantized[0].float()).abs().max() < FP8_AT_LOAD_ATOL


@pytest.mark.parametrize("emulate_cast", [False, True], ids=["cvt", "bitwise"])
@pytest.mark.parametrize("n", [4096, 14336, 28672, 1001])
def test_fused_fp8_quantization_matches_torch_on_cuda(n, emulate_cast):
    """The fused per-token quantization (model/fp8_quant_triton.py) equals fp8.quantize_rows on
    CUDA bit for bit, at LLaMA-3's linear inputs (one tile; 28672 in two passes) and an odd
    length: bf16 rows over six decades, an all-zero row; with the GPU's cast and with the
    bitwise one the CPU tests run; eagerly and replayed from a CUDA graph on new values."""
    from megatron_lamina.fp8 import quantize_rows
    from megatron_lamina.model.fp8_quant_triton import quantize_rows_fused

    g = torch.Generator(device="cuda").manual_seed(n)

    def draw():
        x = torch.randn(257, n, device="cuda", generator=g) * torch.logspace(-6, 3, 257, device="cuda")[:, None]
        x[0] = 0
        return x.to(torch.bfloat16)

    def check(values, scales, x):
        want_values, want_scales = quantize_rows(x)
        assert torch.equal(scales, want_scales)
        assert torch.equal(values.view(torch.uint8), want_values.view(torch.uint8))

    x = draw()
    check(*quantize_rows_fused(x, emulate_cast=emulate_cast), x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        values, scales = quantize_rows_fused(x, emulate_cast=emulate_cast)
    x.copy_(draw())
    graph.replay()
    check(values, scales, x)


@pytest.mark.parametrize("rows, n_in, n_out", [(255, 4096, 6144), (64, 14336, 4096), (0, 4096, 6144)])
def test_fp8_matmul_on_cuda(rows, n_in, n_out):
    """fp8_matmul on CUDA (fused quantization, then torch._scaled_mm) equals the same
    _scaled_mm of torch's quantization exactly, and the CPU path's float32 product of the
    dequantized operands within its documented bound: one bf16 rounding (2^-8 of each value),
    up to the order of float32 sums (1e-4 of the terms' magnitudes, far above it, while a
    missed scale is off by factors)."""
    from megatron_lamina.fp8 import quantize_rows, quantize_weight
    from megatron_lamina.model.fp8_linear import fp8_matmul, scaled_matmul

    g = torch.Generator(device="cuda").manual_seed(n_in + rows)
    x = torch.randn(1, rows, n_in, device="cuda", generator=g).to(torch.bfloat16)
    weight, weight_scale = quantize_weight(0.02 * torch.randn(n_out, n_in, device="cuda", generator=g))
    out = fp8_matmul(x, weight, weight_scale)
    assert out.shape == (1, rows, n_out) and out.dtype == torch.bfloat16
    if rows == 0:
        return
    xq, x_scale = quantize_rows(x[0])
    assert torch.equal(out[0], scaled_matmul(xq, x_scale, weight, weight_scale))
    x_dq, w_dq = xq.float() * x_scale, weight.float() * weight_scale[:, None]
    want = (x_dq.double() @ w_dq.double().t()).float()
    bound = 2**-8 * want.abs() + 1e-4 * (x_dq.abs().double() @ w_dq.abs().double().t()).float()
    assert ((out[0].float() - want).abs() <= bound).all()
