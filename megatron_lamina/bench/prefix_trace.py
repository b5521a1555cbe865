"""Mooncake traces' shared prefixes: prompts built from `hash_ids`, and the offline LRU bound.

A Mooncake request lists `hash_ids`, one per 512-token block of its prompt; equal ids mean
equal blocks (../shared/traces/README.md). `hash_prompt` turns them into token ids so that a
replay offers the server exactly that sharing: block i of a prompt is the 512 tokens drawn
from a generator seeded by (seed, hash id), cut at the prompt's length. `lru_hit_bound`
replays the same prompts through an LRU cache of whole 512-token blocks of a given capacity
(None: unlimited) and counts the prompt tokens a request could take from it (its longest
run of cached blocks from the start, its last token always computed, as the engine's prefix
cache does): the hit rate a measured one is held against. The serving replay
(bench/serving_replay.py `--prefix-blocks`), the prefix-cache benchmark
(bench/prefix_replay.py) and tools/prefix_cache_bound.py (`bound_main`, its program) use them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import OrderedDict
from pathlib import Path

from megatron_lamina.planner.trace import TRACE_BLOCK, read_trace


def read_hash_ids(path: str | Path, limit: int | None = None, skip: int = 0) -> list[list[int]]:
    """The `hash_ids` of requests `skip` .. `skip + limit`, in the order `read_trace` returns them."""
    return [list(r.hash_ids) for r in read_trace(path, limit=limit, skip=skip)]


def hash_prompt(hash_ids: list[int], length: int, token_range: tuple[int, int], seed: int = 0) -> list[int]:
    """`length` token ids in [lo, hi): block i is the block of `hash_ids[i]` (the last one
    cut); blocks past the ids (a prompt longer than its ids cover) are the request's own."""
    lo, hi = token_range
    tokens: list[int] = []
    for i in range(-(-length // TRACE_BLOCK)):
        key = hash_ids[i] if i < len(hash_ids) else ("own", tuple(hash_ids), i)
        rng = random.Random(f"{seed}:{key}")
        tokens += [rng.randrange(lo, hi) for _ in range(min(TRACE_BLOCK, length - len(tokens)))]
    return tokens


def lru_hit_bound(requests: list[tuple[list[int], int]], capacity_tokens: int | None) -> dict:
    """Prompt tokens an LRU cache of `capacity_tokens` (whole 512-token blocks; None:
    unlimited) serves to `requests` = [(hash ids, prompt length)] in arrival order."""
    capacity = None if capacity_tokens is None else capacity_tokens // TRACE_BLOCK
    cache: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for ids, length in requests:
        full = min(len(ids), length // TRACE_BLOCK)  # blocks the prompt fills
        reusable = min(full, (length - 1) // TRACE_BLOCK)  # its last token is always computed
        run = 0
        while run < reusable and ids[run] in cache:
            run += 1
        hits += run * TRACE_BLOCK
        total += length
        for block in ids[:full]:
            cache[block] = None
            cache.move_to_end(block)
        while capacity is not None and len(cache) > capacity:
            cache.popitem(last=False)
    return {"capacity_tokens": capacity_tokens, "prompt_tokens": total, "hit_tokens": hits,
            "hit_rate": hits / total if total else 0.0}


def bound_main(argv: list[str] | None = None) -> int:
    """tools/prefix_cache_bound.py: the bound of a trace's first requests, per capacity and unlimited."""
    p = argparse.ArgumentParser(description="The offline LRU prefix-cache hit-rate bound of a Mooncake trace's "
                                            "first requests (bench/prefix_trace.py).")
    p.add_argument("trace", help="a Mooncake JSONL trace with hash_ids")
    p.add_argument("--capacity-tokens", type=int, nargs="*", default=[], help="cache sizes, in tokens")
    p.add_argument("--max-requests", type=int, default=None)
    p.add_argument("--max-input-len", type=int, default=None, help="prompts clipped, as a replay clips them")
    args = p.parse_args(argv)
    try:
        trace = read_trace(args.trace, limit=args.max_requests)
        ids = read_hash_ids(args.trace, limit=args.max_requests)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    clip = args.max_input_len or max(r.input_len for r in trace)
    requests = [(i, min(r.input_len, clip)) for i, r in zip(ids, trace)]
    rows = [lru_hit_bound(requests, c) for c in [*args.capacity_tokens, None]]
    print(json.dumps({"trace": args.trace, "requests": len(requests), "bounds": rows}, indent=1))
    return 0

