"""KV block allocation per request shard, with the prefix cache (driver only; DESIGN.md section 6).

One pool per attention shard (every shard's cache has the same number of blocks). The block
manager is the only writer of block tables: it places a new request on a shard, grows a
request's table as its context grows, and frees it when the request finishes or is preempted.

The prefix cache is vLLM's automatic prefix caching, kept here and nowhere else (the workers
only ever see block ids, so every layout shares it: TP ranks and head groups hold the same
block id for a token, each request shard its own pool). A full block whose KV has been
computed is registered under its chained hash (prefix_hash.py); blocks are reference-counted,
and a block nobody holds goes back to its shard's free queue with its hash still on it, so a
later request with the same prefix takes it back instead of recomputing it. The free queue
hands out blocks that hold nothing reusable first, then cached ones least recently freed
first (their hash is dropped then: an eviction). A request is admitted with its longest
cached prefix (`place`, `admit`), capped so its last known token is always computed, on the
shard holding most of it unless that shard is much fuller than the emptiest. Blocks are
registered only once the steps that compute them have been planned before the current one
(`register`), so a hit never reads KV that the same step writes.

With a host tier (`kv_cache.host_cache_gib`) each shard also has `host_blocks` slots of
pinned host memory on the ranks that hold its KV (worker/host_tier.py). A cached block
evicted from the device is copied to a host slot (an offload; the host tier keeps its slots
least recently used first and holds every block it copied back too), and a prefix found
there is copied back into fresh device blocks (a load). The copies travel in the step's plan
(`StepPlan.offloads`, `loads`: (shard, device block, host slot) triples) and run on the
holders before the step's attention, offloads first: a slot a load reads this step is never
an offload's target (`_pending`), and a block an offload reads is taken for a load only after
it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from megatron_lamina.driver.prefix_hash import extend_block_hashes
from megatron_lamina.driver.request import Request


@dataclass
class PrefixCacheStats:
    """Cumulative counters of the prefix cache, as /metrics shows them (vLLM's: in tokens)."""

    queries: int = 0        # known tokens of the requests admitted that could use the cache
    hits: int = 0           # of those, tokens taken from cached blocks on the device
    host_hits: int = 0      # tokens taken from the host tier (copied back)
    evictions: int = 0      # cached device blocks whose hash was dropped to reuse the block
    offloads: int = 0       # blocks copied from the device to the host tier
    loads: int = 0          # blocks copied from the host tier back to the device

    def as_tuple(self) -> tuple[int, ...]:
        return self.queries, self.hits, self.host_hits, self.evictions, self.offloads, self.loads


class HostPool:
    """One request shard's host-tier slots: the hash each holds, least recently used first."""

    def __init__(self, num_slots: int):
        self.lru: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_slots))  # taken from the front
        self.hash_of: list[bytes | None] = [None] * num_slots
        self.slot_of: dict[bytes, int] = {}
        self.pending: list[int] = []  # slots a load reads this step: out of `lru` until the plan is out

    def keep(self, key: bytes) -> int | None:
        """The slot that will hold `key` (None: it already does, and is now the most recent)."""
        slot = self.slot_of.get(key)
        if slot is not None:
            if slot in self.lru:
                self.lru.move_to_end(slot)
            return None
        if not self.lru:
            return None  # every slot is being read this step: the block is not kept
        slot, _ = self.lru.popitem(last=False)
        old = self.hash_of[slot]
        if old is not None:
            del self.slot_of[old]
        self.hash_of[slot], self.slot_of[key] = key, slot
        self.lru[slot] = None
        return slot

    def read(self, slot: int) -> None:
        """A load reads `slot` this step: no offload may write it before the plan is out."""
        if slot in self.lru:
            del self.lru[slot]
            self.pending.append(slot)

    def step_done(self) -> None:
        for slot in self.pending:
            self.lru[slot] = None  # read just now: the most recent
        self.pending.clear()


class ShardPool:
    """One request shard's blocks: their reference counts, the free queue, the cached hashes."""

    def __init__(self, num_blocks: int, host_slots: int = 0):
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # taken from the front
        self.refs = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.block_of: dict[bytes, int] = {}
        self.host = HostPool(host_slots) if host_slots else None
        self.offloads: list[tuple[int, int]] = []  # (device block, host slot) planned this step
        self.loads: list[tuple[int, int]] = []

    def take(self, stats: PrefixCacheStats) -> int:
        block, _ = self.free.popitem(last=False)
        key = self.hash_of[block]
        if key is not None:
            del self.block_of[key]
            self.hash_of[block] = None
            stats.evictions += 1
            slot = self.host.keep(key) if self.host is not None else None
            if slot is not None:
                self.offloads.append((block, slot))
                stats.offloads += 1
        self.refs[block] = 1
        return block

    def load(self, key: bytes, slot: int, stats: PrefixCacheStats) -> int:
        """A device block holding `key` again, copied back from host `slot` this step."""
        block = self.take(stats)
        self.loads.append((slot, block))
        self.hash_of[block], self.block_of[key] = key, block
        stats.loads += 1
        return block

    def hold(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1

    def drop(self, table: list[int]) -> None:
        # The last block goes first, so a request's tail is evicted before its head (vLLM);
        # a block that caches nothing goes to the front, to be reused before any cached one.
        for block in reversed(table):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
                if self.hash_of[block] is None:
                    self.free.move_to_end(block, last=False)

    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """The blocks of the longest cached run of `hashes`: a device block id, or -1 - slot
        for a block the host tier holds."""
        hits = []
        for key in hashes:
            block = self.block_of.get(key)
            if block is None and self.host is not None:
                slot = self.host.slot_of.get(key)
                block = None if slot is None else -1 - slot
            if block is None:
                break
            hits.append(block)
        return hits


class BlockManager:
    def __init__(self, num_shards: int, num_blocks: int, block_size: int, prefix_caching: bool = True,
                 host_blocks: int = 0):
        """`host_blocks`: host-tier slots per shard (0: no host tier; only with prefix caching)."""
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.host_blocks = host_blocks if prefix_caching else 0
        self.pools = [ShardPool(num_blocks, self.host_blocks) for _ in range(num_shards)]
        self.stats = PrefixCacheStats()
        # A shard with the most cached prefix wins unless it has this many fewer free blocks
        # than the emptiest shard: reuse, as far as the shards stay balanced.
        self.balance_slack = num_blocks // 4

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_free(self, shard: int) -> int:
        return len(self.pools[shard].free)

    def emptiest_shard(self) -> int:
        return max(range(len(self.pools)), key=lambda s: (len(self.pools[s].free), -s))

    def can_grow(self, request: Request, context_len: int) -> bool:
        extra = self.blocks_needed(context_len) - len(request.block_table)
        return extra <= len(self.pools[request.shard].free)

    def grow(self, request: Request, context_len: int) -> None:
        """Make the request's block table cover `context_len` tokens."""
        assert self.can_grow(request, context_len)
        pool = self.pools[request.shard]
        while len(request.block_table) < self.blocks_needed(context_len):
            request.block_table.append(pool.take(self.stats))

    # Admission: the longest cached prefix, on the shard that holds most of it.

    def place(self, request: Request) -> tuple[int, list[int]]:
        """(the shard for a waiting request, the cached blocks of its prefix there). At least
        its last known token is left to compute: its logits are what the step samples from."""
        if not self.prefix_caching or request.params.prompt_logprobs is not None:
            return self.emptiest_shard(), []  # prompt log-probabilities need every prompt token's logits
        self._hash(request, request.num_tokens)
        hashes = request.block_hashes[:(request.num_tokens - 1) // self.block_size]
        emptiest = self.emptiest_shard()
        floor = len(self.pools[emptiest].free) - self.balance_slack
        best, best_hits = emptiest, self.pools[emptiest].cached_prefix(hashes)
        for shard, pool in enumerate(self.pools):
            if shard != emptiest and len(pool.free) >= floor:
                hits = pool.cached_prefix(hashes)
                if len(hits) > len(best_hits):
                    best, best_hits = shard, hits
        return best, best_hits

    def can_admit(self, shard: int, hits: list[int], context_len: int) -> bool:
        pool = self.pools[shard]
        on_device = sum(1 for b in hits if b >= 0)
        taken_from_free = sum(1 for b in hits if b >= 0 and pool.refs[b] == 0)
        return self.blocks_needed(context_len) - on_device + taken_from_free <= len(pool.free)

    def admit(self, request: Request, shard: int, hits: list[int], context_len: int) -> None:
        """Give a waiting request the cached blocks `hits` (host ones copied back into new
        blocks) and new blocks up to `context_len` tokens. The device hits are held and the
        host ones' slots set aside first, so making room for the rest evicts none of them."""
        assert not request.block_table and self.can_admit(shard, hits, context_len)
        pool = self.pools[shard]
        for block in hits:
            if block >= 0:
                pool.hold(block)
            else:
                pool.host.read(-1 - block)
        table = []
        for i, block in enumerate(hits):
            table.append(block if block >= 0 else pool.load(request.block_hashes[i], -1 - block, self.stats))
        request.shard, request.block_table, request.num_registered = shard, table, len(hits)
        if self.prefix_caching and request.params.prompt_logprobs is None:
            host = sum(1 for b in hits if b < 0)
            self.stats.queries += request.num_tokens
            self.stats.hits += (len(hits) - host) * self.block_size
            self.stats.host_hits += host * self.block_size
        self.grow(request, context_len)

    def take_copies(self) -> tuple[list[int], list[int]]:
        """The step's host-tier copies as the plan carries them: (shard, device block, host
        slot) triples, offloads then loads; the slots the loads read return to the LRU."""
        offloads, loads = [], []
        for shard, pool in enumerate(self.pools):
            if pool.host is None:
                continue
            offloads += [x for block, slot in pool.offloads for x in (shard, block, slot)]
            loads += [x for slot, block in pool.loads for x in (shard, block, slot)]
            pool.offloads.clear()
            pool.loads.clear()
            pool.host.step_done()
        return offloads, loads

    # Registration: a full block computed by steps planned before this one.

    def register(self, request: Request, computed: int) -> None:
        """Cache the request's full blocks among its first `computed` tokens (their KV is
        written by steps already planned; tokens still on the device are not counted)."""
        full = min(computed, request.num_tokens) // self.block_size
        if full <= request.num_registered or not self.prefix_caching:
            return
        self._hash(request, full * self.block_size)
        pool = self.pools[request.shard]
        for i in range(request.num_registered, full):
            key, block = request.block_hashes[i], request.block_table[i]
            if key not in pool.block_of and pool.hash_of[block] is None:
                pool.block_of[key], pool.hash_of[block] = block, key
        request.num_registered = full

    def release(self, request: Request) -> None:
        """Free the request's blocks, caching those it computed (a preempted request finds
        them again when it is readmitted, as long as nobody evicted them)."""
        self.register(request, request.num_computed)
        self.pools[request.shard].drop(request.block_table)
        request.block_table, request.num_registered = [], 0

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (the blocks held by running requests stay theirs); the
        number of blocks that were cached."""
        dropped = 0
        for pool in self.pools:
            dropped += len(pool.block_of)
            pool.block_of.clear()
            pool.hash_of = [None] * len(pool.hash_of)
            if pool.host is not None:
                dropped += len(pool.host.slot_of)
                pool.host.slot_of.clear()
                pool.host.hash_of = [None] * len(pool.host.hash_of)
        return dropped

    def _hash(self, request: Request, num_tokens: int) -> None:
        if len(request.block_hashes) < num_tokens // self.block_size:
            extend_block_hashes(request.block_hashes, request.tokens, num_tokens, self.block_size,
                                request.cache_salt)
