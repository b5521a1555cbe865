"""The prefix cache changes no output, in every kind of layout (real gloo ranks, tiny LLaMA).

Requests that share prefixes (a long common head, a shorter one, an exact repeat, greedy and
seeded) run with `kv_cache.prefix_caching` off and on, in the same ranks, in layouts of each
kind: colocated TP 2, one attention worker, head groups (TP 2 x 2 groups) and three request
shards, with two micro-batches where disaggregated, small blocks and a small prefill budget
(prompts span several blocks and prefill chunks, so later requests are admitted after
earlier ones computed the shared blocks, and hit them). Tokens and finish reasons must be
those of the cache off, every step's logits (so every log-probability) within 1e-5 in
float32, as the layout tests hold one mode to another: the rows a step's matrix products see
differ (a cached prefix is not recomputed beside the new tokens), so the last bits may. The
cache must have served a share of the prompts. Two layouts run a third time with a device
cache that holds one request, one at a time, and a host tier: shared prefixes
come back from host memory, with the same outputs. Layouts of the same world size share one
set of ranks.
"""

from __future__ import annotations

import pytest
from layout_job import generate_on_ranks
from spawn_ranks import run_ranks

from megatron_lamina.requests.sampling_params import SamplingParams

HEAD = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52]  # 3 full blocks of 4, then 2
PROMPTS = [HEAD + [7, 8, 9], HEAD + [60], HEAD[:9] + [3, 3, 3, 3, 3], HEAD + [7, 8, 9], [1, 77, 78, 79, 80, 81],
           HEAD + [7, 8, 9, 10, 11, 12, 13], [1, 77, 78, 79, 80, 81, 82, 83, 84]]
REQUESTS = [(p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)) for p in PROMPTS] + [
    (p, SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=30 + i, ignore_eos=True))
    for i, p in enumerate(PROMPTS[:3])]
COMMON = ["kv_cache.block_size=4", "kv_cache.num_blocks=48", "scheduler.max_prefill_tokens=8"]
# 8 blocks of 4 hold one request, run one at a time; about 50 host slots of the tiny model's
# blocks (2 KB at 2 KV heads).
HOST_TIER = ["kv_cache.num_blocks=8", "scheduler.max_batch_size=1", "scheduler.micro_batches=1",
             "kv_cache.host_cache_gib=0.0001"]

WORLDS = {  # world size: layouts (tensor_parallel, attention_workers, attention_head_groups, micro_batches,
    #                       with the host-tier run)
    2: {"colocated-tp2": (2, 0, 1, 1, True), "tp1-attn1": (1, 1, 1, 2, True)},
    4: {"tp2-attn2-heads": (2, 2, 2, 2, False), "tp1-attn3-requests": (1, 3, 1, 2, False)},
}


@pytest.mark.parametrize("world", WORLDS)
def test_cache_on_gives_the_outputs_of_cache_off(world, tiny_models):
    checkpoint = str(tiny_models["untied"].canonical_dir)
    cases, labels = [], []
    for name, (tp, workers, groups, micro_batches, host_tier) in WORLDS[world].items():
        layout = [f"parallel.tensor_parallel={tp}", f"parallel.attention_workers={workers}",
                  f"parallel.attention_head_groups={groups}", f"scheduler.micro_batches={micro_batches}", *COMMON]
        for caching in ("false", "true"):
            cases.append((checkpoint, layout + [f"kv_cache.prefix_caching={caching}"]))
            labels.append((name, caching))
        if host_tier:
            cases.append((checkpoint, layout + HOST_TIER))
            labels.append((name, "host tier"))
    results = dict(zip(labels, run_ranks(generate_on_ranks, world, cases, REQUESTS)))
    for name, layout in WORLDS[world].items():
        off, on, host = results[name, "false"], results[name, "true"], results.get((name, "host tier"))
        assert off["cached_tokens"] == [0] * len(REQUESTS), name
        # The repeats and shared heads found their blocks (a share, not a count: which requests
        # are admitted after which depends on the layout's shards and budget).
        assert sum(on["cached_tokens"]) >= 4 * 8, (name, on["cached_tokens"])
        if host is not None:
            queries, hits, host_hits, evictions, offloads, loads = host["prefix_stats"]
            assert host_hits >= 8 and loads == host_hits // 4 and offloads >= loads, (name, host["prefix_stats"])
        for mode, run in (("on", on), ("host tier", host)) if host else (("on", on),):
            assert run["tokens"] == off["tokens"] and run["reasons"] == off["reasons"], (name, mode)
            for got, want in zip(run["logits"], off["logits"]):
                assert got.shape == want.shape and (got - want).abs().max() < 1e-5, (name, mode, (got - want).abs().max())
