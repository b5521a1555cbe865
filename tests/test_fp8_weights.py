"""FP8 weights (issue 26): `lamina convert --weight-dtype fp8_e4m3` writes e4m3 linear weights
with per-output-channel scales, the loader shards the scales with their rows, and the model
workers (model/fp8_linear.py, dequantized on the CPU) generate from them at TP 2, colocated
and disaggregated, with and without an FP8 KV cache, in one 2-rank job.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REQUESTS
from fp8_checks import check_fp8_run
from layout_job import generate_on_ranks
from safetensors import safe_open
from spawn_ranks import run_ranks

from megatron_lamina.checkpoint.layout import FP8_LINEAR_WEIGHTS, is_fp8_linear, scale_name
from megatron_lamina.checkpoint.loader import CheckpointShardLoader
from megatron_lamina.fp8 import FP8

# Logits of the tiny models with FP8 weights (and KV) against float32 transformers: each
# weight and activation keeps 3 mantissa bits, which moved these logits by at most 0.27
# (2026-12-07, every case below); 0.6 leaves room for other seeds, while a weight read
# without its scale is off by a factor of hundreds.
FP8_ATOL = 0.6


@pytest.fixture(scope="module")
def fp8_checkpoint(tiny_models, tmp_path_factory):
    from megatron_lamina.checkpoint.convert import convert_checkpoint

    model = tiny_models["untied"]
    out = tmp_path_factory.mktemp("fp8") / "canonical"
    return model, convert_checkpoint("hf", model.hf_dir, out, dtype="float32", weight_dtype="fp8_e4m3")


def test_checkpoint_stores_e4m3_weights_with_channel_scales(fp8_checkpoint):
    """Linear weights e4m3 [out, in] with float32 scales [out]; everything else as converted
    without the option; every dequantized weight within e4m3's rounding of the source."""
    model, fp8_dir = fp8_checkpoint
    assert json.loads((fp8_dir / "config.json").read_text())["weight_dtype"] == "fp8_e4m3"
    with safe_open(model.canonical_dir / "model.safetensors", "pt") as full, \
            safe_open(fp8_dir / "model.safetensors", "pt") as fp8:
        names = set(fp8.keys())
        assert names == set(full.keys()) | {scale_name(n) for n in full.keys() if is_fp8_linear(n)}
        assert sum(n.endswith(FP8_LINEAR_WEIGHTS) for n in names) == 4 * 2  # 4 projections x 2 layers
        for name in full.keys():
            source = full.get_tensor(name)
            if not is_fp8_linear(name):
                assert torch.equal(fp8.get_tensor(name), source), name
                continue
            weight, scale = fp8.get_tensor(name), fp8.get_tensor(scale_name(name))
            assert weight.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == source.shape[:1]
            # each row's largest magnitude is e4m3's largest value: the whole range is used
            assert torch.equal(weight.float().abs().amax(dim=1), torch.full(scale.shape, 448.0))
            error = (weight.float() * scale[:, None] - source).abs()
            assert (error <= source.abs() / 16 + scale[:, None] / 2**9).all(), name


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_scales_shard_with_their_rows(fp8_checkpoint, tp_rank):
    """At TP 2 each rank's dequantized weight shard is that rank's shard of the dequantized
    whole: column-parallel scales split with the rows (fc1: gate and up chunks), row-parallel
    ones whole."""
    _, fp8_dir = fp8_checkpoint
    whole, shard = CheckpointShardLoader(fp8_dir, 0, 1), CheckpointShardLoader(fp8_dir, tp_rank, 2)
    for layer in range(2):
        for part in FP8_LINEAR_WEIGHTS:
            name = f"decoder.layers.{layer}.{part}"
            full = whole.tensor(name).float() * whole.tensor(scale_name(name))[:, None]
            mine = shard.tensor(name).float() * shard.tensor(scale_name(name))[:, None]
            rows, cols = full.shape
            if part.endswith("linear_fc1.weight"):
                half = rows // 2
                want = torch.cat([full[tp_rank * half // 2:(tp_rank + 1) * half // 2],
                                  full[half + tp_rank * half // 2:half + (tp_rank + 1) * half // 2]])
            elif part.endswith("linear_qkv.weight"):
                want = full[tp_rank * rows // 2:(tp_rank + 1) * rows // 2]
            else:
                want = full[:, tp_rank * cols // 2:(tp_rank + 1) * cols // 2]
            assert shard.tensor(name).dtype == FP8 and torch.equal(mine, want), name


def test_fp8_weights_generate_at_tp2(fp8_checkpoint):
    """Colocated TP 2 (FP8 weights, then FP8 weights and KV) and TP 1 with an attention worker
    (both), against float32 transformers as fp8_checks.py holds FP8 runs (the tiny random
    models' logits are nearly flat: a greedy token may move at a near tie)."""
    model, fp8_dir = fp8_checkpoint
    common = ["kv_cache.block_size=4", "kv_cache.num_blocks=32", "scheduler.max_prefill_tokens=8"]
    layouts = {
        "colocated TP 2": ["parallel.tensor_parallel=2", "parallel.attention_workers=0"],
        "colocated TP 2, FP8 KV": ["parallel.tensor_parallel=2", "parallel.attention_workers=0",
                                   "kv_cache.dtype=fp8_e4m3"],
        "TP 1 + attention worker, FP8 KV": ["parallel.tensor_parallel=1", "parallel.attention_workers=1",
                                            "scheduler.micro_batches=2", "kv_cache.dtype=fp8_e4m3"],
    }
    cases = [(str(fp8_dir), common + overrides) for overrides in layouts.values()]
    results = run_ranks(generate_on_ranks, 2, cases, REQUESTS)
    assert len(results) == len(cases)
    for label, result in zip(layouts, results):
        check_fp8_run(label, result, model.tokens, model.logits, FP8_ATOL)


def test_convert_command_line_writes_fp8_weights(tiny_models, tmp_path, capsys):
    """`lamina convert --weight-dtype fp8_e4m3` (the converter's command line) writes FP8 weights;
    a weight dtype it does not know is refused naming the choices."""
    from megatron_lamina.launch.convert import main

    hf_dir = tiny_models["untied"].hf_dir
    out = tmp_path / "fp8"
    assert main(["--source", "hf", "--input", str(hf_dir), "--output", str(out), "--weight-dtype", "fp8_e4m3"]) == 0
    assert json.loads((out / "config.json").read_text())["weight_dtype"] == "fp8_e4m3"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("decoder.layers.0.mlp.linear_fc2.weight").dtype == FP8
    with pytest.raises(SystemExit):
        main(["--source", "hf", "--input", str(hf_dir), "--output", str(tmp_path / "x"), "--weight-dtype", "int4"])
    err = capsys.readouterr().err
    assert "argument --weight-dtype: invalid choice: 'int4'" in err and "fp8_e4m3" in err
