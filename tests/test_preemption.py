"""A KV cache made too small for the batch: requests are preempted and recomputed, and every
one still completes with the reference tokens (real gloo ranks: 1 model worker, 2
attention shards, 2 micro-batches). A prompt that can never fit is refused with a clear
error instead."""

from __future__ import annotations

import pytest
import torch
from layout_job import generate_on_ranks
from spawn_ranks import run_ranks
from tiny_models import reference_generate

from megatron_lamina.requests.sampling_params import SamplingParams

PROMPTS = [[1, 5, 9, 14, 3], [1, 40, 41, 42, 43, 44, 45], [1, 77], [1, 8, 100, 200], [1, 9, 9, 2, 7, 7],
           [1, 60, 61], [1, 33, 34, 35, 36, 37, 38, 39], [1, 120]]
LAYOUT = ["parallel.tensor_parallel=1", "parallel.attention_workers=2", "scheduler.micro_batches=2",
          "kv_cache.block_size=4", "kv_cache.num_blocks=8", "scheduler.max_prefill_tokens=8"]


def test_small_cache_preempts_and_every_request_completes(tiny_models):
    model = tiny_models["untied"]
    params = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True) for _ in PROMPTS]
    params[2] = SamplingParams(max_tokens=16, temperature=0.9, seed=5, ignore_eos=True)
    expected, expected_logits = reference_generate(model.hf_dir, PROMPTS, params)
    [result] = run_ranks(generate_on_ranks, 3, [(str(model.canonical_dir), LAYOUT)], list(zip(PROMPTS, params)))
    assert result["preemptions"] > 0  # 8 blocks of 4 per shard cannot hold 4 requests of ~20 tokens
    assert result["tokens"] == expected
    assert result["reasons"] == ["length"] * len(PROMPTS)
    for got, want in zip(result["logits"], expected_logits):
        assert torch.allclose(got, want, atol=1e-4, rtol=0)


def test_prompt_that_can_never_fit_is_refused(tiny_models):
    from megatron_lamina.driver.block_manager import BlockManager
    from megatron_lamina.driver.request import Request
    from megatron_lamina.driver.scheduler import Scheduler

    scheduler = Scheduler(BlockManager(2, num_blocks=8, block_size=4), 16, 8, 2, max_model_len=256)
    with pytest.raises(ValueError, match="one attention shard's KV cache holds 32 tokens"):
        scheduler.add(Request(0, list(range(40)), SamplingParams()))
    with pytest.raises(ValueError, match="the model's context is 256 tokens"):
        scheduler.add(Request(1, list(range(256)), SamplingParams()))


def test_request_that_outgrows_a_whole_shard_ends_with_length(tiny_models):
    """A context that no longer fits even an empty shard ends the request ("length") instead
    of preempting it and recomputing it forever."""
    model = tiny_models["untied"]
    layout = ["parallel.attention_workers=0", "kv_cache.block_size=4", "kv_cache.num_blocks=4"]
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    [result] = run_ranks(generate_on_ranks, 1, [(str(model.canonical_dir), layout)], [([1, 5, 9], params)])
    assert result["reasons"] == ["length"]
    # 4 blocks of 4 hold the prompt and 13 generated tokens; the 14th is sampled from the last.
    assert len(result["tokens"][0]) == 16 - 3 + 1
