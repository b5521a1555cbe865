"""The fused elementwise kernels CUDA graphs capture (a model built with
`fused_elementwise=True`: Megatron's torch.compile'd SwiGLU and our compiled RoPE) against
the eager ones, on CPU.

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

from megatron_lamina.host_to_device import HostArrays
from megatron_lamina.plan import MicroBatch, SequenceChunk, StepPlan

PLANS = [
    StepPlan([MicroBatch([SequenceChunk(0, 0, 0, [5, 6, 7, 8], [], True)])]),
    StepPlan([MicroBatch([SequenceChunk(i, 0, 3 + i, [i + 1], [], True) for i in range(5)])]),
    StepPlan([MicroBatch([SequenceChunk(0, 0, 9, [4], [], True), SequenceChunk(1, 0, 0, [1, 2, 3], [], True)])]),
    StepPlan([MicroBatch([SequenceChunk(i, 0, 7, [i + 2], [], True) for i in range(3)])]),
]


def _logits(checkpoint):
    import torch.distributed as dist

    from megatron_lamina.architecture import read_architecture
    from megatron_lamina.checkpoint.loader import CheckpointShardLoader
    from megatron_lamina.worker.model_worker import ModelWorker
    from megatron_lamina.worker.token_feed import TokenFeed
    from megatron_lamina.model.llama import LlamaModel
    from megatron_lamina.model.rope import apply_rotary
    from megatron_lamina.transport.channel import LocalChannel

    class Attention:  # depends on every row's q, k and v
        def host_index(self, chunks):
            return HostArrays({})

        def __call__(self, layer, index, q, k, v):
            return torch.tanh(q) + (k * v).repeat_interleave(q.shape[1] // v.shape[1], dim=1)

    dist.init_process_group("gloo")
    arch = read_architecture(checkpoint)
    loader = CheckpointShardLoader(checkpoint, 0, 1, torch.float32)
    out = {}
    for fuse in (False, True):
        model = LlamaModel(arch, torch.float32, dist.group.WORLD, loader.padded_vocab_size, fused_elementwise=fuse)
        loader.load_into(model)
        worker = ModelWorker(model, LocalChannel(Attention()), TokenFeed(dist.group.WORLD, torch.device("cpu")))
        out[fuse] = [worker.run(plan) for plan in PLANS]
        out[f"kernels {fuse}"] = (model.config.bias_activation_fusion,
                                  model.decoder.layers[0].rotary is not apply_rotary)
    return out


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_fused_elementwise_matches_eager(tiny_model):
    out = run_ranks(_logits, 1, str(tiny_model.canonical_dir))
    assert out["kernels True"] == (True, True) and out["kernels False"] == (False, False)
    for eager, fused in zip(out[False], out[True]):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
