"""Every layout gives the reference model's tokens: real gloo ranks, tiny LLaMA vs transformers.

Each layout starts its ranks once and runs the untied and the tied model with 1 and 2
micro-batches (1 to 4 in two layouts), with the asynchronous step loop (the default), and the
last case again with the synchronous one. Small KV blocks and a small prefill budget make the prompts span several
blocks and several prefill chunks. Greedy tokens must equal `transformers`', seeded samples
must equal those drawn from `transformers`' logits with the same seed, and the logits of
every step must agree within 1e-4 (float32). A layout with switches (q-first) runs its cases
once more without them, in the same ranks: tokens equal, logits within 1e-5.
Every layout also runs the untied model once with an FP8 KV cache (`kv_cache.dtype:
fp8_e4m3`, stored e4m3 and dequantized by the reference attention), in the same ranks,
held to `transformers` as fp8_checks.py holds FP8 runs, with FP8_ATOL.
"""

from __future__ import annotations

import pytest
import torch
from conftest import REQUESTS
from fp8_checks import check_fp8_run
from layout_job import generate_on_ranks
from spawn_ranks import run_ranks

# FP8 KV against float32 transformers on the tiny models: e4m3 keeps 3 mantissa bits (a
# relative error up to 1/16 per stored k, v), which moved these logits by at most 0.113
# (the same in every layout, 2026-12-07); twice that leaves room for other seeds of the same
# arithmetic. The kernels' own FP8 path is held to the reference exactly (test_triton_prefill.py).
FP8_ATOL = 0.25
FP8_KV = "kv_cache.dtype=fp8_e4m3"

LAYOUTS = {  # name: (tensor_parallel, attention_workers, attention_head_groups, micro-batch counts, *switches)
    "tp1-attn1": (1, 1, 1, (1, 2)),
    "tp2-attn2-heads": (2, 2, 2, (1, 2)),
    "tp1-attn2-requests": (1, 2, 1, (1, 2, 3, 4)),
    "tp2-attn4-grid": (2, 4, 2, (1, 2)),
    # q-first (q sent before k, v; decode micro-batches attend the cache, then merge the new
    # token): each attention worker hears from both TP ranks, each TP rank from both shards.
    "tp2-attn2-requests-q-first": (2, 2, 1, (1, 2), "runtime.q_first=true"),
    "colocated-tp1": (1, 0, 1, (1, 2, 3, 4)),
    "colocated-tp2": (2, 0, 1, (1, 2)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_transformers(layout, tiny_models):
    tp, workers, groups, micro_batch_counts, *switches = LAYOUTS[layout]
    cases, expected = [], []
    for name, model in tiny_models.items():
        for micro_batches in micro_batch_counts:
            cases.append((str(model.canonical_dir), [
                f"parallel.tensor_parallel={tp}", f"parallel.attention_workers={workers}",
                f"parallel.attention_head_groups={groups}", f"scheduler.micro_batches={micro_batches}",
                "kv_cache.block_size=4", "kv_cache.num_blocks=32", "scheduler.max_prefill_tokens=8", *switches,
            ]))
            expected.append((f"{name}, micro_batches={micro_batches}", model))
    # The synchronous step loop too (the asynchronous one, the default, is every case above).
    cases.append((cases[-1][0], cases[-1][1] + ["scheduler.async_scheduling=false"]))
    expected.append((expected[-1][0] + ", synchronous loop", expected[-1][1]))
    # An FP8 KV cache: the untied model at the layout's most micro-batches.
    cases.append((cases[len(micro_batch_counts) - 1][0], cases[len(micro_batch_counts) - 1][1] + [FP8_KV]))
    expected.append((expected[len(micro_batch_counts) - 1][0] + ", FP8 KV", expected[len(micro_batch_counts) - 1][1]))
    without = [(checkpoint, [o for o in overrides if o not in switches]) for checkpoint, overrides in cases]
    results = run_ranks(generate_on_ranks, tp + workers, cases + (without if switches else []), REQUESTS)
    results, baseline = results[:len(cases)], results[len(cases):]
    assert len(results) == len(cases) and len(baseline) == (len(cases) if switches else 0)
    for (label, model), result, (_, overrides) in zip(expected, results, cases):
        assert result["reasons"] == ["length"] * len(REQUESTS), label
        if FP8_KV in overrides:
            check_fp8_run(label, result, model.tokens, model.logits, FP8_ATOL)
            continue
        assert result["tokens"] == model.tokens, label
        for got, want in zip(result["logits"], model.logits):
            assert torch.allclose(got, want, atol=1e-4, rtol=0), (label, (got - want).abs().max())
    for (label, _), result, base in zip(expected, results, baseline):
        assert result["tokens"] == base["tokens"], (label, "without", switches)
        for got, want in zip(result["logits"], base["logits"]):
            assert torch.allclose(got, want, atol=1e-5, rtol=0), (label, "without", switches, (got - want).abs().max())

