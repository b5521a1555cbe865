"""A random-weight checkpoint drawn at load (issue 26's 70B on one card: its 140 GB of bf16
weights cannot be written to the device's disk): `write_random_spec` writes config.json, the
tokenizer and an empty model.safetensors; each model worker draws its parameters on its device
(`fill_random`, seeded per parameter and TP rank), quantizing FP8 linears by the converter's
rule under `model.weight_dtype: fp8_e4m3`.

Checked: the checkpoint is a few small files that `lamina`'s start-up check accepts; the drawn
model has the values it should (matrices N(0, 0.02), norms 1, e4m3 rows scaled to their
largest value); the model worker's model is built on the device it is drawn on (no host copy:
LLaMA-3-70B's would take 64 GB of host memory); a TP 2 job (real gloo ranks) generates from it, the same tokens on a second
start, and with FP8 weights within FP8's rounding of the unquantized logits.
"""

from __future__ import annotations

import torch
from conftest import REQUESTS
from layout_job import generate_on_ranks
from spawn_ranks import run_ranks

from megatron_lamina.checkpoint.random_weights import fill_random, generated_at_load, write_random_spec
from megatron_lamina.fp8 import FP8, FP8_MAX

# As tests/test_fp8_weights.py: FP8 moves tiny random models' logits by well under this, a
# weight read without its scale by hundreds.
FP8_ATOL = 0.6


def test_the_spec_is_small_and_the_start_up_check_accepts_it(tmp_path):
    from megatron_lamina.cli import check_job
    from megatron_lamina.launch.serve import build_parser

    spec = write_random_spec(tmp_path / "spec", "llama3-70b", seed=3)
    assert sum(f.stat().st_size for f in spec.rglob("*") if f.is_file()) < 20 << 20   # the tokenizer, mostly
    assert generated_at_load(spec) == {"shape": "llama3-70b", "seed": 3, "std": 0.02}
    args = build_parser().parse_args(["--set", f"model.checkpoint={spec}", "--set", "parallel.attention_workers=0"])
    cfg = check_job("serve", args)  # `lamina serve`'s check: the architecture, the (empty) safetensors header
    assert cfg.model.checkpoint == str(spec)


def test_fill_random_draws_the_model_on_its_device():
    import torch.distributed as dist

    from megatron_lamina.architecture import ModelArchitecture
    from megatron_lamina.model.llama import LlamaModel
    from megatron_lamina.planner.shapes import PRESETS

    arch: ModelArchitecture = PRESETS["tiny"].to_architecture()
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1) \
        if not dist.is_initialized() else None
    try:
        for fp8 in (False, True):
            model = LlamaModel(arch, torch.float32, dist.group.WORLD, arch.vocab_size, fp8_weights=fp8)
            fill_random(model, seed=0)
            for name, p in model.named_parameters():
                if name.endswith("weight_scale"):
                    continue
                if p.dim() == 1:
                    assert torch.equal(p, torch.ones_like(p)), name
                elif p.dtype == FP8:
                    assert torch.equal(p.float().abs().amax(dim=1), torch.full(p.shape[:1], FP8_MAX)), name
                    weight = p.float() * model.get_parameter(name + "_scale")[:, None]
                    assert abs(weight.std().item() - 0.02) < 0.002, name
                else:
                    assert abs(p.std().item() - 0.02) < 0.002, name
    finally:
        dist.destroy_process_group()


def test_the_model_is_built_on_its_device():
    """`new_model` allocates every parameter and buffer on the device asked, FP8 weights and
    their scales too: on the meta device, which holds no memory, nothing is left on the host."""
    import torch.distributed as dist

    from megatron_lamina.checkpoint.random_weights import random_architecture
    from megatron_lamina.worker.worker_factory import new_model

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1) \
        if not dist.is_initialized() else None
    try:
        for fp8 in (False, True):
            model = new_model(random_architecture("tiny"), torch.bfloat16, dist.group.WORLD, torch.device("meta"),
                              fp8_weights=fp8)
            tensors = dict(model.named_parameters()) | dict(model.named_buffers())
            assert {name: t.device.type for name, t in tensors.items()} == dict.fromkeys(tensors, "meta")
            assert any(t.dtype == FP8 for t in tensors.values()) == fp8
    finally:
        dist.destroy_process_group()


def test_a_tp2_job_serves_the_spec(tmp_path):
    spec = write_random_spec(tmp_path / "spec", "tiny")
    tp2 = ["parallel.tensor_parallel=2", "parallel.attention_workers=0", "kv_cache.block_size=4",
           "kv_cache.num_blocks=64", "scheduler.max_prefill_tokens=8"]
    cases = [(str(spec), tp2), (str(spec), tp2), (str(spec), [*tp2, "model.weight_dtype=fp8_e4m3"])]
    first, again, fp8 = run_ranks(generate_on_ranks, 2, cases, REQUESTS)
    assert [len(t) for t in first["tokens"]] == [params.max_tokens for _, params in REQUESTS]
    assert again["tokens"] == first["tokens"]   # seeded per parameter and rank
    for mine, unquantized in zip(fp8["logits"], first["logits"]):
        assert mine.shape == unquantized.shape and not torch.equal(mine, unquantized)
        # the same prefix: compare the logits of the first step (later steps may follow other tokens)
        assert (mine[0] - unquantized[0]).abs().max() < FP8_ATOL
