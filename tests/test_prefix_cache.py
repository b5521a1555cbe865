"""The prefix cache in the driver's block manager (driver/block_manager.py), driven by the real
scheduler: hits share block ids and skip those tokens' prefill, the last prompt token is always
computed, salts never share a block, free cached blocks are evicted least recently freed first
(and never the ones a request being admitted is taking), and finishing, aborting and
preempting give every reference back. After every step the pools' reference counts, free
queues and hash maps must agree with the running requests' tables."""

from __future__ import annotations

from collections import Counter

import pytest

from megatron_lamina.driver.block_manager import BlockManager
from megatron_lamina.driver.request import Request
from megatron_lamina.requests.sampling_params import SamplingParams
from megatron_lamina.driver.scheduler import Scheduler

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def make(num_blocks=16, shards=1, caching=True, budget=64, batch=8):
    return Scheduler(BlockManager(shards, num_blocks, 4, caching), batch, budget, 1, max_model_len=512)


def check_pools(scheduler: Scheduler) -> None:
    blocks = scheduler.blocks
    for shard, pool in enumerate(blocks.pools):
        held = Counter(b for r in scheduler.running if r.shard == shard for b in r.block_table)
        assert [pool.refs[b] for b in range(blocks.num_blocks)] == [held[b] for b in range(blocks.num_blocks)]
        assert set(pool.free) == {b for b in range(blocks.num_blocks) if held[b] == 0}
        assert {b: k for k, b in pool.block_of.items()} == {b: k for b, k in enumerate(pool.hash_of) if k}
        # A block in two tables is a cached one, and the same position of both prefixes.
        for b, n in held.items():
            assert n == 1 or pool.hash_of[b] is not None


def step(scheduler: Scheduler, token: int = 7):
    """Plan a step and 'run' it: every sampled request gets `token`; those at max_tokens end."""
    plan = scheduler.schedule()
    by_id = {r.request_id: r for r in scheduler.running}
    for chunk in plan.sampled_chunks:
        request = by_id[chunk.request_id]
        request.output_token_ids.append(token)
        if len(request.output_token_ids) >= request.params.max_tokens:
            scheduler.finish(request, "length")
    check_pools(scheduler)
    return plan


def run_all(scheduler: Scheduler) -> list:
    plans = []
    while scheduler.has_work():
        plans.append(step(scheduler))
    return plans


def chunk_of(plan, request):
    return next(c for mb in plan.micro_batches for c in mb.chunks if c.request_id == request.request_id)


def test_a_shared_prefix_is_computed_once():
    scheduler = make()
    prompt = list(range(1, 15))  # 14 tokens: 3 full blocks of 4, then 2
    first = Request(0, prompt, GREEDY)
    scheduler.add(first)
    run_all(scheduler)
    second = Request(1, prompt[:12] + [99, 98], GREEDY)   # the same 3 blocks, then its own
    third = Request(2, prompt[:12], GREEDY)                # exactly 3 blocks: its last token is computed
    scheduler.add(second)
    scheduler.add(third)
    plan = step(scheduler)
    a, b = chunk_of(plan, second), chunk_of(plan, third)
    assert (a.start, a.tokens) == (12, [99, 98]) and a.new_blocks[:3] == first_blocks(scheduler, prompt)
    # Whole blocks only: its third block holds its last token, which is computed, so it is
    # written again into a block of its own.
    assert (b.start, b.tokens) == (8, [9, 10, 11, 12]) and b.new_blocks[:2] == a.new_blocks[:2]
    assert b.new_blocks[2] != a.new_blocks[2]
    assert (second.num_cached_tokens, third.num_cached_tokens) == (12, 8)
    stats = scheduler.blocks.stats
    assert (stats.queries, stats.hits) == (14 + 14 + 12, 12 + 8)
    run_all(scheduler)


def first_blocks(scheduler, prompt):
    pool = scheduler.blocks.pools[0]
    probe = Request(99, prompt, GREEDY)
    scheduler.blocks._hash(probe, len(prompt))
    return [pool.block_of[k] for k in probe.block_hashes[:3]]


def test_off_means_no_hits():
    scheduler = make(caching=False)
    for i in range(2):
        request = Request(i, list(range(1, 15)), GREEDY)
        scheduler.add(request)
        plan = step(scheduler)
        assert chunk_of(plan, request).start == 0 and request.num_cached_tokens == 0
        run_all(scheduler)
    assert scheduler.blocks.stats.queries == 0 and not scheduler.blocks.pools[0].block_of


def test_two_salts_never_share_a_block():
    scheduler = make()
    prompt = list(range(1, 15))
    for i, salt in enumerate([None, "tenant-a", "tenant-b", "tenant-a", ""]):
        request = Request(i, prompt, GREEDY, cache_salt=salt)
        scheduler.add(request)
        run_all(scheduler)
        assert request.num_cached_tokens == (12 if i == 3 else 0), (i, salt)


def test_eviction_takes_the_least_recently_freed_and_counts():
    scheduler = make(num_blocks=8)
    old, new = list(range(1, 9)), list(range(20, 28))  # two blocks each
    for i, prompt in enumerate([old, new]):
        scheduler.add(Request(i, prompt, SamplingParams(temperature=0, max_tokens=1)))
        run_all(scheduler)
    # 4 blocks cached (old's two, then new's two), 4 never used: a 17-token prompt takes the
    # 4 unused ones, then one cached block, the least recently freed: old's tail block.
    pool = scheduler.blocks.pools[0]
    assert len(pool.block_of) == 4
    scheduler.add(Request(2, list(range(40, 57)), SamplingParams(temperature=0, max_tokens=1)))
    run_all(scheduler)
    assert scheduler.blocks.stats.evictions == 1
    again_new, again_old = Request(3, new, GREEDY), Request(4, old, GREEDY)
    for r in (again_new, again_old):
        scheduler.add(r)
    run_all(scheduler)
    assert again_new.num_cached_tokens == 4  # (8 - 1) // 4 blocks: its last token computed
    assert again_old.num_cached_tokens == 4  # its first block survived; its tail was evicted


def test_memory_pressure_keeps_every_request_exact_in_blocks():
    """Many requests over a few shared prefixes on a cache far too small: admissions evict,
    running requests preempt each other, and the pools stay consistent every step."""
    scheduler = make(num_blocks=10, shards=2, budget=16, batch=6)
    prefixes = [list(range(1, 9)), list(range(30, 42)), list(range(60, 64))]
    for i in range(24):
        prompt = prefixes[i % 3] + [100 + i] * (i % 5)
        scheduler.add(Request(i, prompt, SamplingParams(temperature=0, max_tokens=12 + i % 8)))
    run_all(scheduler)
    stats = scheduler.blocks.stats
    assert stats.hits > 0 and stats.evictions > 0 and scheduler.num_preemptions > 0
    assert all(pool.refs == [0] * 10 for pool in scheduler.blocks.pools)


def test_a_prefix_evicted_while_its_request_is_admitted():
    """The cached prefix sits at the front of the free queue, where the request's own new
    blocks come from: it is held first, so making room never evicts it. Then the same prefix
    evicted by another admission in the same step: the request computes it again."""
    scheduler = make(num_blocks=6)
    prompt = list(range(1, 9))
    for i, p in enumerate([prompt, list(range(100, 116))]):  # 2 blocks, then the other 4
        scheduler.add(Request(i, p, SamplingParams(temperature=0, max_tokens=1)))
        run_all(scheduler)
    pool = scheduler.blocks.pools[0]
    first = list(pool.free)[:2]  # the prefix, least recently freed: evicted first
    wanting = Request(2, prompt + list(range(50, 62)), SamplingParams(temperature=0, max_tokens=1))
    scheduler.add(wanting)  # 20 tokens: 5 blocks of 6, the 2 cached ones and 3 evicted others
    plan = step(scheduler)
    chunk = chunk_of(plan, wanting)
    assert wanting.num_cached_tokens == 8 and chunk.start == 8 and len(chunk.new_blocks) == 5
    assert sorted(chunk.new_blocks[:2]) == sorted(first) and scheduler.blocks.stats.evictions == 3
    run_all(scheduler)
    # A stranger admitted first takes every block, evicting the prefix; the request behind it
    # finds nothing cached once it is admitted, and computes from the start.
    stranger = Request(3, list(range(200, 223)), SamplingParams(temperature=0, max_tokens=1))
    late = Request(4, prompt, SamplingParams(temperature=0, max_tokens=1))
    scheduler.add(stranger)
    scheduler.add(late)
    plan = step(scheduler)
    assert len(chunk_of(plan, stranger).new_blocks) == 6 and late.status.value == "waiting"
    scheduler.blocks._hash(late, len(prompt))
    assert late.block_hashes[0] not in pool.block_of
    run_all(scheduler)
    assert late.num_cached_tokens == 0 and late.finished


def test_abort_and_preemption_give_references_back():
    scheduler = make(num_blocks=8, budget=64, batch=4)
    prompt = list(range(1, 13))
    holders = [Request(i, prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)) for i in range(3)]
    scheduler.add(holders[0])
    step(scheduler)
    step(scheduler)  # its prompt blocks are registered when its next chunk is planned
    for r in holders[1:]:
        scheduler.add(r)
    step(scheduler)
    pool = scheduler.blocks.pools[0]
    shared = holders[0].block_table[0]
    assert holders[1].block_table[0] == holders[2].block_table[0] == shared and pool.refs[shared] == 3
    assert scheduler.blocks.stats.hits == 16
    scheduler.finish(holders[1], "abort")  # an abort
    check_pools(scheduler)
    assert pool.refs[shared] == 2
    run_all(scheduler)  # the two others outgrow the cache together: one is preempted, readmitted
    assert scheduler.num_preemptions > 0 and all(r.finished for r in holders)
    assert pool.refs == [0] * 8 and len(pool.free) == 8
    # Readmitted, the preempted one found its own blocks again (it computed them before).
    assert scheduler.blocks.stats.hits > 16


def test_prompt_logprobs_skip_the_cache():
    scheduler = make()
    prompt = list(range(1, 15))
    scheduler.add(Request(0, prompt, GREEDY))
    run_all(scheduler)
    echo = Request(1, prompt, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    scheduler.add(echo)
    plan = step(scheduler)
    assert chunk_of(plan, echo).start == 0 and echo.num_cached_tokens == 0


def test_shards_place_by_prefix_as_far_as_balance_allows():
    scheduler = make(num_blocks=40, shards=2, batch=8)
    prompt = list(range(1, 13))
    owner = Request(0, prompt, SamplingParams(temperature=0, max_tokens=1))
    scheduler.add(owner)
    run_all(scheduler)  # shard 0 (the emptiest, the lower) caches it
    follower = Request(1, prompt + [5], SamplingParams(temperature=0, max_tokens=30))
    scheduler.add(follower)
    step(scheduler)
    assert follower.shard == 0 and follower.num_cached_tokens == 12
    # Shard 0 now far fuller than shard 1 (more than a quarter of the cache): balance wins.
    hog = Request(2, list(range(100, 140)), SamplingParams(temperature=0, max_tokens=1))
    scheduler.add(hog)
    step(scheduler)
    assert hog.shard == 1
    filler = Request(3, list(range(300, 344)), SamplingParams(temperature=0, max_tokens=30))
    scheduler.add(filler)
    step(scheduler)
    late = Request(4, prompt + [6], SamplingParams(temperature=0, max_tokens=1))
    scheduler.add(late)
    step(scheduler)
    free = [scheduler.blocks.num_free(s) for s in (0, 1)]
    assert late.shard == (0 if free[0] + 10 >= free[1] else 1)
    run_all(scheduler)


def test_reset_forgets_every_prefix():
    scheduler = make()
    prompt = list(range(1, 15))
    scheduler.add(Request(0, prompt, GREEDY))
    run_all(scheduler)
    assert scheduler.blocks.reset_prefix_cache() == 4  # 14 prompt tokens, 3 of the 4 outputs computed
    again = Request(1, prompt, GREEDY)
    scheduler.add(again)
    run_all(scheduler)
    assert again.num_cached_tokens == 0


def test_the_config_key_is_checked():
    from megatron_lamina.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="kv_cache.prefix_caching"):
        load_config(None, ["model.checkpoint=x", "kv_cache.prefix_caching=maybe"])


# ---------------------------------------------------------------------------- the host tier

def test_host_tier_keeps_every_prefix_exact():
    """A device cache far too small and a host tier: cached blocks evicted from the device go
    to host slots and come back on a hit. A real cache and host tier run each plan's copies,
    then every chunk checks that its context before `start` holds its own tokens (what a
    step's attention would read) and writes its new ones: a copy in the wrong order, to the
    wrong slot, or a slot overwritten while a load still needed it, shows."""
    import torch

    from megatron_lamina.attention.kv_cache import PagedKVCache
    from megatron_lamina.worker.host_tier import HostTier

    blocks = BlockManager(2, 8, 4, True, host_blocks=16)
    scheduler = Scheduler(blocks, 2, 12, 2, max_model_len=512)
    caches = [PagedKVCache(2, 8, 4, 1, 1, torch.float32) for _ in range(2)]
    tiers = [HostTier(cache, 16, shard) for shard, cache in enumerate(caches)]
    prefixes = [list(range(1, 13)), list(range(40, 52)), list(range(70, 82)), list(range(90, 102))]
    for i in range(40):
        prompt = prefixes[i % 4] + [100 + i] * (1 + i % 3)
        scheduler.add(Request(i, prompt, SamplingParams(temperature=0, max_tokens=2 + i % 5)))
    checked = 0
    while scheduler.has_work():
        plan = scheduler.schedule()
        for tier in tiers:
            tier.apply(plan)
        by_id = {r.request_id: r for r in scheduler.running}
        for chunk in (c for mb in plan.micro_batches for c in mb.chunks):
            request, cache = by_id[chunk.request_id], caches[chunk.shard]
            table = torch.tensor(chunk.block_table)
            before = torch.arange(chunk.start)
            k, v = cache.read(0, table[before // 4] * 4 + before % 4)
            want = torch.tensor(request.tokens(0, chunk.start), dtype=torch.float32)
            assert torch.equal(k[:, 0, 0], want) and torch.equal(v[:, 0, 0], want), (chunk, request.request_id)
            checked += chunk.start
            now = torch.arange(chunk.start, chunk.end)
            values = torch.tensor(request.tokens(chunk.start, chunk.end) if chunk.feed < 0 else [0],
                                  dtype=torch.float32)[:, None, None]
            for layer in (0, 1):
                cache.write(layer, table[now // 4] * 4 + now % 4, values, values)
        for chunk in plan.sampled_chunks:
            request = by_id[chunk.request_id]
            request.output_token_ids.append(7)
            if len(request.output_token_ids) >= request.params.max_tokens:
                scheduler.finish(request, "length")
        check_pools(scheduler)
    stats = blocks.stats
    assert stats.host_hits > 0 and stats.loads > 0 and stats.offloads > 0 and stats.hits > 0 and checked > 0
    assert all(pool.refs == [0] * 8 for pool in blocks.pools)


def test_a_slot_being_loaded_is_never_an_offload_target():
    """One host slot: a request takes its prefix back from it while its own admission evicts
    another cached block from the device; that block cannot go to the slot the load reads."""
    scheduler = make(num_blocks=3)
    scheduler.blocks = BlockManager(1, 3, 4, True, host_blocks=1)
    first, other = list(range(1, 9)), list(range(20, 28))
    for i, prompt in enumerate([first, other]):  # first's block 0 is offloaded when other evicts it
        scheduler.add(Request(i, prompt, SamplingParams(temperature=0, max_tokens=1)))
        plan = step(scheduler)
        run_all(scheduler)
    pool = scheduler.blocks.pools[0]
    assert pool.host.hash_of[0] is not None and scheduler.blocks.stats.offloads >= 1
    again = Request(2, first + [5], SamplingParams(temperature=0, max_tokens=1))
    scheduler.add(again)
    plan = step(scheduler)
    # Its first block still on the device, its second in slot 0: copied back into a block
    # whose own cached content had nowhere to go (the only slot is being read).
    assert plan.loads == [0, plan.loads[1], 0] and again.num_cached_tokens == 8 and plan.offloads == []
    assert scheduler.blocks.stats.host_hits == 4 and scheduler.blocks.stats.hits == 4


def test_reset_forgets_the_host_tier_too():
    blocks = BlockManager(1, 3, 4, True, host_blocks=4)
    scheduler = Scheduler(blocks, 4, 64, 1, max_model_len=512)
    for i, prompt in enumerate([list(range(1, 9)), list(range(20, 28)), list(range(1, 10))]):
        scheduler.add(Request(i, prompt, SamplingParams(temperature=0, max_tokens=1)))
        run_all(scheduler)
    assert blocks.stats.host_hits == 4 and blocks.pools[0].host.slot_of
    blocks.reset_prefix_cache()
    assert not blocks.pools[0].host.slot_of and not blocks.pools[0].block_of


def test_a_batch_line_carries_its_salt():
    """The batch job's line takes `cache_salt` (the shared request schema) into the engine's
    input; an empty salt is refused naming the field."""
    from megatron_lamina.batch.batch_job import parse_line

    line = parse_line(1, b'{"id": 1, "prompt": [1, 2, 3], "cache_salt": "tenant-a"}')
    assert line.item.cache_salt == "tenant-a"
    assert parse_line(2, b'{"id": 2, "prompt": [1, 2, 3]}').item.cache_salt is None
    bad = parse_line(3, b'{"id": 3, "prompt": [1, 2, 3], "cache_salt": ""}')
    assert bad.item is None and "cache_salt" in bad.error
