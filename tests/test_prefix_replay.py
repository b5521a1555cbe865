"""The prefix-cache benchmark's pieces (bench/prefix_trace.py, bench/prefix_replay.py,
bench/prefix_predict.py).

Prompts built from Mooncake hash_ids share exactly the blocks whose ids are equal; the
offline LRU bound counts, on a small hand-made trace, exactly the tokens a cache of that
capacity serves (whole blocks from the start, the last token computed, least recently used
evicted; requests before the measured ones only fill it), and on the real conversation trace
the issue's unlimited figure; the bound tool prints it, for a window after a warm-up too. A
replayed window's warm-up is prefill only at time 0, and once its blocks cover the capacity
the bound after it is the bound after the whole trace before the window. The prediction
(the planner's simulator on the same window) serves nothing with the cache off, more with
the warm-up than without and more with the host tier than without, and holds the LRU bound.
Then the whole benchmark program on the CPU with the tiny model (colocated, the cache off and
on with a host tier, a window of the conversation trace clipped to its context after a
warm-up): every request completes, the cache off serves nothing, on it serves every window
request the trace's shared first block (the warm-up computed it), and the bound's capacity
counts the host tier's blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_lamina.bench.prefix_trace import (
    TRACE_BLOCK, bound_main, hash_prompt, lru_hit_bound, read_hash_ids, replay_window, window_bounds,
)
from megatron_lamina.planner.trace import read_trace, select

ROOT = Path(__file__).resolve().parents[1]
CONVERSATION = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
needs_traces = pytest.mark.skipif(not CONVERSATION.is_file(), reason="no request traces beside the checkout")
H200_COSTS = ROOT / "configs" / "planner" / "costs" / "h200-llama3-8b-tp1-graphs.json"


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
    # Measured from r3 on: r1 and r2 fill the cache only (r3 takes 2, r4 none, r5 1 block).
    assert lru_hit_bound(requests, None, measure_from=2) == {
        "capacity_tokens": None, "prompt_tokens": 7 * B, "hit_tokens": 3 * B, "hit_rate": 3 / 7}


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
    assert bound_main([str(CONVERSATION), "--skip", "30", "--warmup", "20", "--max-requests", "20"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"] == 20 and report["bounds"] == [lru_hit_bound(requests[10:50], None, 20)]


@needs_traces
def test_the_window_after_its_warm_up():
    warm, window = replay_window(CONVERSATION, skip=300, warmup=100, requests=50, rate=4, max_input_len=7680,
                                 max_output_len=256)
    trace = read_trace(CONVERSATION, limit=350)
    assert [r.hash_ids for r in warm + window] == [r.hash_ids for r in trace[200:]]
    assert {(r.arrival_s, r.output_len) for r in warm} == {(0.0, 1)}  # all at once, prefill only
    assert window == select(trace[300:], poisson_rate=4, max_input_len=7680, max_output_len=256)[0]
    capacity = 100 * TRACE_BLOCK  # fewer blocks than the warm-up's
    bounds = window_bounds(CONVERSATION, warm, window, 300, capacity, 7680)
    whole = [(list(r.hash_ids), min(r.input_len, 7680)) for r in trace]
    steady = lru_hit_bound(whole, capacity, 300)["hit_rate"]
    assert bounds["at_capacity"] == bounds["whole_history_at_capacity"] == steady
    assert bounds["unlimited"] < bounds["whole_history_unlimited"] == lru_hit_bound(whole, None, 300)["hit_rate"]
    with pytest.raises(ValueError, match="--warmup 301"):
        replay_window(CONVERSATION, skip=300, warmup=301, requests=5, rate=4)


@needs_traces
def test_the_prediction(tmp_path):
    from megatron_lamina.bench.prefix_predict import main

    def predict(warmup: int, modes: str) -> dict:
        out = tmp_path / f"predicted-{warmup}.json"
        main(["--costs", str(H200_COSTS), "--traces", "conversation", "--modes", modes, "--skip", "300",
              "--warmup", str(warmup), "--requests", "40", "--set", "kv_cache.num_blocks=12000",
              "--host-cache-gib", "32", "--out", str(out)])
        report = json.loads(out.read_text())
        assert report["device_blocks"] == 12000 and report["host_blocks"] == 32 * 512  # 2 MiB a block
        return {row["mode"]: row for row in report["predicted"]}

    cold, warm = predict(0, "host"), predict(100, "off,on,host")
    assert warm["off"]["hit_rate"] == 0 and warm["off"]["warmup_s"] is None
    assert warm["host"]["hit_rate"] > warm["on"]["hit_rate"] and warm["host"]["hit_rate"] > cold["host"]["hit_rate"]
    assert warm["host"]["capacity_tokens"] == (12000 + 32 * 512) * 16
    for row in (warm["on"], warm["host"]):
        assert row["warmup_s"] > 0 and row["ttft_s"]["count"] == 40
        assert row["hit_rate"] >= 0.95 * row["bound"]["at_capacity"]  # the target, held by the engine's cache


@needs_traces
def test_the_benchmark_on_the_cpu(tmp_path, tiny_models):
    from megatron_lamina.bench.prefix_replay import main

    main(["--out-dir", str(tmp_path), "--work-dir", str(tmp_path), "--device", "cpu", "--checkpoint", str(tiny_models["untied"].canonical_dir),
          "--config", str(ROOT / "configs" / "colocated-cpu.yaml"), "--set", "kv_cache.block_size=4",
          "--set", "kv_cache.num_blocks=256", "--traces", "conversation", "--skip", "3", "--warmup", "3",
          "--requests", "4", "--rate", "8", "--max-input-len", "40", "--max-output-len", "3", "--token-ids", "3", "250",
          "--modes", "off,host", "--host-cache-gib", "0.001"])
    results = json.loads((tmp_path / "prefix_cache.json").read_text())
    off, on = results["conversation/off"], results["conversation/host"]
    assert off["completed"] == on["completed"] == 4 and off["prefix_cache_hit_rate"] == 0
    assert "warmup" not in off and on["warmup"]["requests"] == 3 and on["warmup"]["failed"] == 0
    # Clipped to 40 tokens every prompt is the head of the conversation's shared first block
    # (hash id 0): the LRU bound (whole 512-token blocks) finds nothing; the engine's 4-token
    # blocks hold what the warm-up computed, so every window request takes 36 tokens (its last is computed).
    # The capacity: 256 device blocks and the host tier's 524 (0.001 GiB of 2 KiB blocks), of 4 tokens.
    assert on["bound"] == {"at_capacity": 0.0, "unlimited": 0.0, "whole_history_at_capacity": 0.0,
                           "whole_history_unlimited": 0.0, "capacity_tokens": (256 + 524) * 4}
    records = json.loads((tmp_path / "replay-conversation-host.json").read_text())["requests"]
    assert [r["cached_tokens"] for r in records] == [36] * 4 and [r["input_len"] for r in records] == [40] * 4
    assert on["prefix_cache_hit_rate"] == 36 / 40
    assert on["host_hit_rate"] == 0  # nothing was evicted: every hit is the device's
