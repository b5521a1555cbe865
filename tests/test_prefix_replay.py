"""The prefix-cache benchmark's pieces (bench/prefix_trace.py, bench/prefix_replay.py).

Prompts built from Mooncake hash_ids share exactly the blocks whose ids are equal; the
offline LRU bound counts, on a small hand-made trace, exactly the tokens a cache of that
capacity serves (whole blocks from the start, the last token computed, least recently used
evicted), and on the real conversation trace the issue's unlimited figure; the bound tool
prints it. Then the whole benchmark program on the CPU with the tiny model (colocated, the cache off
and on with a host tier, a few requests of the conversation trace clipped to its context):
every request completes, the cache off serves nothing, on it serves the trace's shared first
block, and the bound's capacity counts the host tier's blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_lamina.bench.prefix_trace import TRACE_BLOCK, bound_main, hash_prompt, lru_hit_bound, read_hash_ids
from megatron_lamina.planner.trace import read_trace

ROOT = Path(__file__).resolve().parents[1]
CONVERSATION = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
needs_traces = pytest.mark.skipif(not CONVERSATION.is_file(), reason="no request traces beside the checkout")


def test_equal_ids_give_equal_blocks():
    a = hash_prompt([7, 8, 9], 1100, (3, 200))
    b = hash_prompt([7, 8, 4], 1100, (3, 200))
    c = hash_prompt([5, 8, 9], 1100, (3, 200))
    assert len(a) == 1100 and all(3 <= t < 200 for t in a)
    assert a[:2 * TRACE_BLOCK] == b[:2 * TRACE_BLOCK] and a[2 * TRACE_BLOCK:] != b[2 * TRACE_BLOCK:]
    assert a[:TRACE_BLOCK] != c[:TRACE_BLOCK] and a[TRACE_BLOCK:2 * TRACE_BLOCK] == c[TRACE_BLOCK:2 * TRACE_BLOCK]
    assert hash_prompt([7], 100, (3, 200)) == a[:100]  # a block cut short is the same block's head


def test_lru_bound_counts_exactly():
    B = TRACE_BLOCK
    requests = [([1, 2, 3], 3 * B), ([1, 2, 4], 3 * B), ([1, 2, 3], 3 * B), ([5, 6], 2 * B), ([1, 2], 2 * B)]
    # unlimited: r1 takes 1, 2 (its third differs); r2 takes 1, 2, and 3 would be its last
    # token's block; r4 takes only block 1 (block 2 holds its last token).
    assert lru_hit_bound(requests, None)["hit_tokens"] == (2 + 2 + 1) * B
    # 3 blocks: r3 sees {2, 4, 1}... least recently used evicted: after r1 the cache is
    # [1, 2, 4] (3 evicted), so r2 takes 1, 2; after r3: [4, 1, 2, 3] -> [1, 2, 3]; r4 (5, 6)
    # evicts 1 and 2: r5 finds nothing.
    assert lru_hit_bound(requests, 3 * B)["hit_tokens"] == (2 + 2) * B
    assert lru_hit_bound([([1, 2], B + 10), ([1, 2], B + 10)], None)["hit_tokens"] == B  # the cut block is not cached


@needs_traces
def test_the_conversation_trace_bound_and_the_tool(capsys):
    trace, ids = read_trace(CONVERSATION), read_hash_ids(CONVERSATION)
    assert len(ids) == len(trace) and all(len(i) == -(-r.input_len // TRACE_BLOCK) for i, r in zip(ids, trace))
    bound = lru_hit_bound([(i, r.input_len) for i, r in zip(ids, trace)], None)
    assert round(bound["hit_rate"], 3) == 0.373  # the 37.4 % counted blocks the engine recomputes
    assert bound_main([str(CONVERSATION), "--max-requests", "50", "--capacity-tokens", "4096"]) == 0
    report = json.loads(capsys.readouterr().out)
    requests = [(i, r.input_len) for i, r in zip(ids[:50], trace[:50])]
    assert report["bounds"] == [lru_hit_bound(requests, 4096), lru_hit_bound(requests, None)]


@needs_traces
def test_the_benchmark_on_the_cpu(tmp_path, tiny_models):
    from megatron_lamina.bench.prefix_replay import main

    main(["--out-dir", str(tmp_path), "--work-dir", str(tmp_path), "--device", "cpu", "--checkpoint", str(tiny_models["untied"].canonical_dir),
          "--config", str(ROOT / "configs" / "colocated-cpu.yaml"), "--set", "kv_cache.block_size=4",
          "--set", "kv_cache.num_blocks=256", "--traces", "conversation", "--requests", "6", "--rate", "2",
          "--max-input-len", "40", "--max-output-len", "3", "--token-ids", "3", "250",
          "--modes", "off,host", "--host-cache-gib", "0.001"])
    results = json.loads((tmp_path / "prefix_cache.json").read_text())
    off, on = results["conversation/off"], results["conversation/host"]
    assert off["completed"] == on["completed"] == 6 and off["prefix_cache_hit_rate"] == 0
    # Clipped to 40 tokens every prompt is the head of the conversation's shared first block:
    # the LRU bound (whole 512-token blocks) finds nothing, the engine's 4-token blocks find
    # what requests admitted in an earlier step computed: 36 tokens (its last is computed).
    # The capacity: 256 device blocks and the host tier's 524 (0.001 GiB of 2 KiB blocks), of 4 tokens.
    assert on["bound"] == {"at_capacity": 0.0, "unlimited": 0.0, "capacity_tokens": (256 + 524) * 4}
    records = json.loads((tmp_path / "replay-conversation-host.json").read_text())["requests"]
    cached = [r["cached_tokens"] for r in records]
    assert set(cached) <= {0, 36} and cached[0] == 0 and 36 in cached, cached
    assert on["prefix_cache_hit_rate"] == sum(cached) / 240
