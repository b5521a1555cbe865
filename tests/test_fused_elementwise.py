"""The fused elementwise kernels CUDA graphs capture (`LlamaModel.fused_elementwise`:
Megatron's torch.compile'd SwiGLU and our compiled RoPE) against the eager ones, on CPU.

torch.compile generates C++ here (Triton on a GPU), so the compiled functions themselves run:
over steps of different token counts (decode rows, prefill chunks), which a compiled function
must serve without a wrong shape specialisation. The GPU tests run the same model on CUDA
against transformers.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from spawn_ranks import run_ranks

from megatron_lamina.plan import MicroBatch, SequenceChunk, StepPlan

PLANS = [
    StepPlan([MicroBatch([SequenceChunk(0, 0, 0, [5, 6, 7, 8], [0], True)])]),
    StepPlan([MicroBatch([SequenceChunk(i, 0, 3 + i, [i + 1], [0], True) for i in range(5)])]),
    StepPlan([MicroBatch([SequenceChunk(0, 0, 9, [4], [0], True), SequenceChunk(1, 0, 0, [1, 2, 3], [1], True)])]),
    StepPlan([MicroBatch([SequenceChunk(i, 0, 7, [i + 2], [0], True) for i in range(3)])]),
]


def _logits(checkpoint):
    import torch.distributed as dist

    from megatron_lamina.architecture import read_architecture
    from megatron_lamina.checkpoint.loader import CheckpointShardLoader
    from megatron_lamina.engine.model_runner import ModelRunner
    from megatron_lamina.model.llama import LlamaModel
    from megatron_lamina.model.rope import apply_rotary
    from megatron_lamina.transport.channel import LocalChannel

    def attend(layer, chunks, q, k, v):  # depends on every row's q, k and v
        return torch.tanh(q) + (k * v).repeat_interleave(q.shape[1] // v.shape[1], dim=1)

    dist.init_process_group("gloo")
    arch = read_architecture(checkpoint)
    loader = CheckpointShardLoader(checkpoint, 0, 1, torch.float32)
    out = {}
    for fuse in (False, True):
        model = LlamaModel(arch, torch.float32, dist.group.WORLD, LocalChannel(attend), loader.padded_vocab_size)
        loader.load_into(model)
        with model.fused_elementwise(fuse):
            out[fuse] = [ModelRunner(model).run(plan) for plan in PLANS]
            fused_inside = (model.config.bias_activation_fusion, model.layers[0].rotate is not apply_rotary)
    out["fused_inside"] = fused_inside
    out["restored"] = (model.config.bias_activation_fusion, model.layers[0].rotate is apply_rotary)
    return out


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_fused_elementwise_matches_eager(tiny_model):
    out = run_ranks(_logits, 1, str(tiny_model.canonical_dir))
    assert out["fused_inside"] == (True, True) and out["restored"] == (False, True)
    for eager, fused in zip(out[False], out[True]):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
