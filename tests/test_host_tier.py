"""The prefix cache's host tier sized as asked (issue 25; worker/host_tier.py, host_memory.py):
`kv_cache.host_cache_gib` becomes whole blocks, the tier holds exactly their bytes and the
start-up line states those blocks and bytes (real ranks: colocated, and the driver's line for
its attention workers); a size that holds no block, one past the host's available memory, and
one that is no finite number are errors naming the key. On a CPU the tier is a plain tensor
(the pinning itself, exactly the size asked, is test_gpu.py's
test_prefix_cache_host_tier_pins_exactly_its_size)."""

from __future__ import annotations

import os

import pytest
import torch
from spawn_ranks import run_ranks

from megatron_lamina.attention.kv_cache import PagedKVCache
from megatron_lamina.config import ConfigError, load_config
from megatron_lamina.plan import StepPlan
from megatron_lamina.worker.host_memory import GIB, available_host_bytes
from megatron_lamina.worker.host_tier import HostTier, host_blocks


def test_a_tier_holds_whole_blocks_of_exactly_its_bytes():
    cache = PagedKVCache(4, 8, 16, 2, 64, torch.bfloat16)
    per_block = PagedKVCache.bytes_per_block(4, 16, 2, 64, torch.bfloat16)  # 32 KiB
    slots = host_blocks(0.003, per_block)  # 3.07 MiB: 98 blocks, no power of two of either
    assert slots == int(0.003 * GIB) // per_block == 98
    tier = HostTier(cache, slots, shard=0)
    assert tier.nbytes == tier.slots.nbytes == slots * per_block and tier.pinned_bytes == 0
    # A block out to the last slot and back into another block: the copies reach the end of it.
    g = torch.Generator().manual_seed(0)
    for layer in tier.layers:
        layer[3] = torch.randint(0, 256, layer.shape[1:], dtype=torch.uint8, generator=g)
    tier.apply(StepPlan(offloads=[0, 3, slots - 1]))
    tier.apply(StepPlan(loads=[0, 5, slots - 1]))
    assert all(torch.equal(layer[5], layer[3]) for layer in tier.layers)
    tier.close()


def test_a_tier_that_holds_no_block_is_refused():
    assert host_blocks(0, 32768) == 0
    with pytest.raises(ConfigError, match=r"kv_cache.host_cache_gib = 1e-05 holds no whole KV block \(32,768 bytes"):
        host_blocks(1e-5, 32768)


def test_a_tier_past_the_hosts_memory_is_refused_before_it_is_allocated():
    assert available_host_bytes() is not None  # Linux: /proc/meminfo
    cache = PagedKVCache(4, 8, 16, 2, 64, torch.bfloat16)
    twice_the_host = 2 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with pytest.raises(RuntimeError, match=r"kv_cache.host_cache_gib: .* GiB available \(MemAvailable"):
        HostTier(cache, twice_the_host // PagedKVCache.bytes_per_block(4, 16, 2, 64, torch.bfloat16), shard=0)


def test_a_host_tier_without_the_prefix_cache_is_refused():
    with pytest.raises(ConfigError, match=r"kv_cache.host_cache_gib = 2 needs kv_cache.prefix_caching: true"):
        load_config(None, ["model.checkpoint=x", "kv_cache.host_cache_gib=2", "kv_cache.prefix_caching=false"])
    load_config(None, ["model.checkpoint=x", "kv_cache.host_cache_gib=0", "kv_cache.prefix_caching=false"])


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_host_cache_gib_is_a_finite_number(value):
    with pytest.raises(ConfigError, match=r"kv_cache.host_cache_gib = (inf|nan): must be a finite number >= 0"):
        load_config(None, ["model.checkpoint=x", f"kv_cache.host_cache_gib={value}"])


def _start_lines(cases):
    """Each case's driver start-up log, its host-tier slots and (colocated) its tier's bytes."""
    import contextlib
    import io

    from megatron_lamina.driver.llm_engine import LLMEngine
    from megatron_lamina.worker.control_plane import serve_plans
    from megatron_lamina.worker.runtime import start_rank

    results, ctx = [], None
    for checkpoint, overrides in cases:
        del ctx  # the previous case's tier is freed before this one is allocated
        log = io.StringIO()
        with contextlib.redirect_stderr(log):
            ctx = start_rank(load_config(None, [f"model.checkpoint={checkpoint}", *overrides]))
        if ctx.rank != 0:
            serve_plans(ctx)
            continue
        LLMEngine(ctx).shutdown()
        tier = getattr(ctx.worker, "host_tier", None)
        results.append({"log": log.getvalue(), "slots": ctx.num_host_blocks,
                        "tier_bytes": tier.nbytes if tier is not None else None})
    return results


def test_the_start_up_line_states_the_blocks_and_bytes_held(tiny_models):
    """64 MiB of host tier: colocated TP 2 (one KV head per rank, 1 KiB blocks) and one
    attention worker (both heads, 2 KiB blocks), whose tier's line the driver prints."""
    checkpoint = str(tiny_models["untied"].canonical_dir)
    common = ["kv_cache.block_size=4", "kv_cache.num_blocks=16", "kv_cache.host_cache_gib=0.0625"]
    colocated, disaggregated = run_ranks(_start_lines, 2, [
        (checkpoint, ["parallel.tensor_parallel=2", "parallel.attention_workers=0", *common]),
        (checkpoint, ["parallel.tensor_parallel=1", "parallel.attention_workers=1", *common])])
    per_block = {heads: PagedKVCache.bytes_per_block(2, 4, heads, 16, torch.float32) for heads in (1, 2)}
    assert colocated["slots"] == GIB // 16 // per_block[1]
    assert colocated["tier_bytes"] == colocated["slots"] * per_block[1]
    assert (f"prefix cache host tier: {colocated['slots']} blocks of 4 tokens ({colocated['slots'] * 4:,} tokens), "
            "0.06 GiB of host memory per cache") in colocated["log"]
    assert disaggregated["slots"] == GIB // 16 // per_block[2]
    assert (f"prefix cache host tier: {disaggregated['slots']} blocks of 4 tokens "
            f"({disaggregated['slots'] * 4:,} tokens), 0.06 GiB of host memory per attention worker "
            "(kv_cache.host_cache_gib = 0.0625, whole blocks)") in disaggregated["log"]
