"""FP8 weights quantized at load (issue 26): `model.weight_dtype: fp8_e4m3` over an unquantized
checkpoint serves exactly what the FP8-converted copy of it serves.

The converter (`quantize_checkpoint`, as `lamina convert --weight-dtype fp8_e4m3` writes) and
the loader share one rule (`fp8.quantize_weight`, per output channel over the whole weight);
so every TP rank's shard of every tensor, and then the tokens and logits of a 2-rank TP job
(real gloo ranks), must be EQUAL, not close; so must `megatron_lamina.LLM(weight_dtype=...)`'s
tokens and log-probabilities against the converted checkpoint's through `LLM`. Also: the key is checked like every config key,
and an FP8 checkpoint asked for bfloat16 weights is one ConfigError.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import REQUESTS
from layout_job import generate_on_ranks
from safetensors import safe_open
from spawn_ranks import run_ranks

from megatron_lamina.checkpoint.loader import CheckpointShardLoader, weight_format
from megatron_lamina.config import ConfigError, load_config
from megatron_lamina.fp8 import FP8


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory):
    """(the untied tiny model's float32 canonical checkpoint, its FP8-converted copy)."""
    from megatron_lamina.checkpoint.convert import quantize_checkpoint

    canonical = tiny_models["untied"].canonical_dir
    return canonical, quantize_checkpoint(canonical, tmp_path_factory.mktemp("fp8") / "canonical")


@pytest.mark.parametrize("tp_rank, tp_size", [(0, 1), (0, 2), (1, 2)])
def test_every_shard_equals_the_converted_checkpoints(checkpoints, tp_rank, tp_size):
    canonical, converted = checkpoints
    at_load = CheckpointShardLoader(canonical, tp_rank, tp_size, torch.float32, quantize_fp8=True)
    stored = CheckpointShardLoader(converted, tp_rank, tp_size, torch.float32)
    with safe_open(converted / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert any(name.endswith("weight_scale") for name in names)
    for name in names:   # weights, their scales, and everything left unquantized
        mine, theirs = at_load.tensor(name), stored.tensor(name)
        assert mine.dtype == theirs.dtype and torch.equal(mine.view(torch.uint8) if mine.dtype == FP8 else mine,
                                                          theirs.view(torch.uint8) if theirs.dtype == FP8 else theirs), name


def test_load_time_fp8_generates_what_the_converted_checkpoint_does_at_tp2(checkpoints):
    canonical, converted = checkpoints
    tp2 = ["parallel.tensor_parallel=2", "parallel.attention_workers=0", "kv_cache.block_size=4",
           "kv_cache.num_blocks=32", "scheduler.max_prefill_tokens=8"]
    cases = [(str(converted), tp2), (str(canonical), [*tp2, "model.weight_dtype=fp8_e4m3"]),
             (str(canonical), tp2)]
    converted_run, load_time_run, unquantized_run = run_ranks(generate_on_ranks, 2, cases, REQUESTS)
    assert load_time_run["tokens"] == converted_run["tokens"]
    for mine, theirs in zip(load_time_run["logits"], converted_run["logits"]):
        assert torch.equal(mine, theirs)
    # ... and it is FP8 that ran: the unquantized checkpoint's logits differ.
    assert any(not torch.equal(a, b) for a, b in zip(unquantized_run["logits"], converted_run["logits"]))


def test_llm_weight_dtype_generates_what_the_converted_checkpoint_does(checkpoints):
    """The offline API's `weight_dtype` keyword is the config key: the same tokens and, to the
    last bit, the same log-probabilities (prompt and generated) as the converted checkpoint;
    and FP8 is what ran (the unquantized checkpoint's log-probabilities differ)."""
    from megatron_lamina import LLM

    canonical, converted = checkpoints
    prompts = [prompt for prompt, _ in REQUESTS]
    params = [dataclasses.replace(p, logprobs=1, prompt_logprobs=1) for _, p in REQUESTS]
    runs = []
    for checkpoint, weight_dtype in [(converted, None), (canonical, "fp8_e4m3"), (canonical, None)]:
        with LLM(str(checkpoint), weight_dtype=weight_dtype, num_blocks=64, block_size=4, max_prefill_tokens=8) as llm:
            runs.append(llm.generate(prompts, params))

    def numbers(run):
        return [[(e.logprob, e.top) for e in [*o.prompt_logprobs[1:], *o.logprobs]] for o in run]

    converted_run, load_time_run, unquantized_run = runs
    assert [o.token_ids for o in load_time_run] == [o.token_ids for o in converted_run]
    assert numbers(load_time_run) == numbers(converted_run)
    assert numbers(unquantized_run) != numbers(converted_run)


def test_the_key_and_the_checkpoint_must_agree(checkpoints):
    canonical, converted = checkpoints
    with pytest.raises(ConfigError, match="model.weight_dtype = 'fp8': must be 'bfloat16' or 'fp8_e4m3' or null"):
        load_config(None, ["model.checkpoint=x", "model.weight_dtype=fp8"])
    assert weight_format(None, canonical) == (False, False)            # default: what the checkpoint holds
    assert weight_format(None, converted) == (True, False)
    assert weight_format("fp8_e4m3", canonical) == (True, True)        # quantized at load
    assert weight_format("fp8_e4m3", converted) == (True, False)       # already FP8
    assert weight_format("bfloat16", canonical) == (False, False)
    with pytest.raises(ConfigError, match="model.weight_dtype = 'bfloat16': checkpoint .* holds FP8 weights"):
        weight_format("bfloat16", converted)
