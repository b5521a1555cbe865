"""Mooncake traces' shared prefixes: prompts built from `hash_ids`, the replayed window, and
the offline LRU bound.

A Mooncake request lists `hash_ids`, one per 512-token block of its prompt; equal ids mean
equal blocks (../shared/traces/README.md). `hash_prompt` turns them into token ids so that a
replay offers the server exactly that sharing: block i of a prompt is the 512 tokens drawn
from a generator seeded by (seed, hash id), cut at the prompt's length. `replay_window` is
the one rule for what a prefix-cache replay sends: the trace's requests `skip` ..
`skip + requests` (the measured window) at Poisson arrivals, after the `warmup` requests
before them sent first as prefill only (one output token each, all at once, not measured),
so that the cache holds at the window's start what the trace before it left there.
`lru_hit_bound` replays the same prompts through an LRU cache of whole 512-token blocks of a
given capacity (None: unlimited) and counts the prompt tokens a request could take from it
(its longest run of cached blocks from the start, its last token always computed, as the
engine's prefix cache does), over the requests from `measure_from` on: the hit rate a
measured one is held against. The serving replay (bench/serving_replay.py
`--prefix-blocks`), the prefix-cache benchmark (bench/prefix_replay.py), its prediction
(bench/prefix_predict.py) and tools/prefix_cache_bound.py (`bound_main`, its program) use
them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import OrderedDict
from pathlib import Path

from megatron_lamina.planner.trace import TRACE_BLOCK, TraceRequest, read_trace, select

WARMUP_OUTPUT_LEN = 1  # a warm-up request only fills the cache: its prefill, one token


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


def check_warmup(skip: int, warmup: int) -> None:
    """A warm-up is some of the requests before the window: 0 .. `skip` of them."""
    if not 0 <= warmup <= skip:
        raise ValueError(f"--warmup {warmup}: the warm-up is the requests before --skip {skip}, so 0 .. {skip}")


def replay_window(path: str | Path, skip: int, warmup: int, requests: int, rate: float, seed: int = 0,
                  max_input_len: int | None = None, max_output_len: int | None = None
                  ) -> tuple[list[TraceRequest], list[TraceRequest]]:
    """(warm-up, window) as a prefix-cache replay sends them (module docstring): the window's
    Poisson arrivals are bench/serving_replay.py's for the same --skip, --rate and --seed; the
    warm-up's all at 0."""
    check_warmup(skip, warmup)
    window, _ = select(read_trace(path, limit=requests, skip=skip), poisson_rate=rate, seed=seed,
                       max_input_len=max_input_len, max_output_len=max_output_len)
    if not warmup:
        return [], window
    warm, _ = select(read_trace(path, limit=warmup, skip=skip - warmup), rate_scale=float("inf"),
                     max_input_len=max_input_len, max_output_len=WARMUP_OUTPUT_LEN)
    return warm, window


def lru_hit_bound(requests: list[tuple[list[int], int]], capacity_tokens: int | None, measure_from: int = 0) -> dict:
    """Prompt tokens an LRU cache of `capacity_tokens` (whole 512-token blocks; None:
    unlimited) serves to `requests` = [(hash ids, prompt length)] in arrival order, counted
    over requests `measure_from` on (those before only fill the cache)."""
    capacity = None if capacity_tokens is None else capacity_tokens // TRACE_BLOCK
    cache: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for index, (ids, length) in enumerate(requests):
        full = min(len(ids), length // TRACE_BLOCK)  # blocks the prompt fills
        reusable = min(full, (length - 1) // TRACE_BLOCK)  # its last token is always computed
        run = 0
        while run < reusable and ids[run] in cache:
            run += 1
        if index >= measure_from:
            hits += run * TRACE_BLOCK
            total += length
        for block in ids[:full]:
            cache[block] = None
            cache.move_to_end(block)
        while capacity is not None and len(cache) > capacity:
            cache.popitem(last=False)
    return {"capacity_tokens": capacity_tokens, "prompt_tokens": total, "hit_tokens": hits,
            "hit_rate": hits / total if total else 0.0}


def window_bounds(path: str | Path, warm: list[TraceRequest], window: list[TraceRequest], skip: int,
                  capacity_tokens: int, max_input_len: int | None = None) -> dict:
    """The LRU bound of a replayed `window` at `capacity_tokens` and unlimited: after its
    warm-up (what the server saw), and after the whole trace before it (`skip` requests,
    clipped alike: the steady state the warm-up stands for; equal at capacity once the
    warm-up's blocks fill it)."""
    def blocks(requests: list[TraceRequest]) -> list[tuple[list[int], int]]:
        return [(list(r.hash_ids), r.input_len) for r in requests]

    history = [] if skip == 0 else select(read_trace(path, limit=skip), max_input_len=max_input_len)[0]
    replayed, whole = blocks(warm + window), blocks(history + window)
    return {"capacity_tokens": capacity_tokens,
            "at_capacity": lru_hit_bound(replayed, capacity_tokens, len(warm))["hit_rate"],
            "unlimited": lru_hit_bound(replayed, None, len(warm))["hit_rate"],
            "whole_history_at_capacity": lru_hit_bound(whole, capacity_tokens, len(history))["hit_rate"],
            "whole_history_unlimited": lru_hit_bound(whole, None, len(history))["hit_rate"]}


def bound_main(argv: list[str] | None = None) -> int:
    """tools/prefix_cache_bound.py: the bound of a window of a trace (its first requests by
    default), per capacity and unlimited."""
    p = argparse.ArgumentParser(description="The offline LRU prefix-cache hit-rate bound of a Mooncake trace's "
                                            "first requests, or of a window after a warm-up (bench/prefix_trace.py).")
    p.add_argument("trace", help="a Mooncake JSONL trace with hash_ids")
    p.add_argument("--capacity-tokens", type=int, nargs="*", default=[], help="cache sizes, in tokens")
    p.add_argument("--max-requests", type=int, default=None)
    p.add_argument("--skip", type=int, default=0, help="the window starts at this request of the trace")
    p.add_argument("--warmup", type=int, default=0,
                   help="the requests before --skip that fill the cache first, not counted")
    p.add_argument("--max-input-len", type=int, default=None, help="prompts clipped, as a replay clips them")
    args = p.parse_args(argv)
    try:
        check_warmup(args.skip, args.warmup)
        limit = None if args.max_requests is None else args.warmup + args.max_requests
        trace = read_trace(args.trace, limit=limit, skip=args.skip - args.warmup)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    clip = args.max_input_len or max(r.input_len for r in trace)
    requests = [(list(r.hash_ids), min(r.input_len, clip)) for r in trace]
    rows = [lru_hit_bound(requests, c, args.warmup) for c in [*args.capacity_tokens, None]]
    print(json.dumps({"trace": args.trace, "skip": args.skip, "warmup": args.warmup,
                      "requests": len(requests) - args.warmup, "bounds": rows}, indent=1))
    return 0

