"""`DecodeGraphs`' plumbing on CPU: the colocated whole-step graph path, its graphs replaced by
stand-ins that run the captured step at replay.

Everything else is the real thing: the real `PagedAttention` (the Triton decode and prefill
kernels, run by Triton's interpreter on the CPU; skipped where Triton is not installed, as in
CI), the static tensors padded to the bucket with the scratch block, the inputs copied in one
transfer, decode tokens fed from the previous step's sampled tokens on the device, the logits
buffer. Against the eager model worker over the torch reference attention on its own cache:
a prefill step then decode steps whose tokens are all fed, logits equal step by step.
"""

from __future__ import annotations

import functools

import pytest
import torch
from spawn_ranks import run_ranks

pytest.importorskip("triton")

PROMPTS = [[1, 5, 9, 14, 3], [1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 77]]


def _compare(checkpoint, announced: bool):
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch.distributed as dist

    from megatron_lamina.architecture import read_architecture
    from megatron_lamina.attention.gpu import PagedAttention
    from megatron_lamina.attention.kv_cache import PagedKVCache
    from megatron_lamina.attention.reference import ReferenceAttention
    from megatron_lamina.worker.block_tables import BlockTables
    from megatron_lamina.checkpoint.loader import CheckpointShardLoader
    from megatron_lamina.worker.cuda_graphs import DecodeGraphs
    from megatron_lamina.worker.model_worker import ModelWorker
    from megatron_lamina.worker.token_feed import TokenFeed
    from megatron_lamina.model.llama import LlamaModel
    from megatron_lamina.plan import MicroBatch, SequenceChunk, StepPlan
    from megatron_lamina.transport.channel import LocalChannel

    class StandIn:
        def __init__(self, step):
            self.replay = step

    class StandInDecodeGraphs(DecodeGraphs):
        def capture(self, progress=None):
            for size in self.sizes:
                self.graphs[size] = StandIn(functools.partial(self.forward, size))

    dist.init_process_group("gloo")
    arch = read_architecture(checkpoint)
    loader = CheckpointShardLoader(checkpoint, 0, 1, torch.float32)
    model = LlamaModel(arch, torch.float32, dist.group.WORLD, loader.padded_vocab_size)
    loader.load_into(model)
    block, blocks = 4, 12
    caches = [PagedKVCache(arch.num_layers, blocks + 1, block, arch.num_kv_heads, arch.head_dim, torch.float32)
              for _ in range(2)]
    cpu = torch.device("cpu")
    graphs = StandInDecodeGraphs(model, PagedAttention(caches[0]), max_batch=8, max_blocks=8, scratch_block=blocks)
    graphs.capture()
    # announced: the tables reach each worker's own BlockTables as the plan's deltas, and the
    # index gathers their rows; else the chunks carry hand-built lists (benchmarks, probes).
    workers = [ModelWorker(model, LocalChannel(PagedAttention(caches[0])), TokenFeed(dist.group.WORLD, cpu),
                           BlockTables(rows=2, max_blocks=1) if announced else None, decode_graphs=graphs),
               ModelWorker(model, LocalChannel(ReferenceAttention(caches[1])), TokenFeed(dist.group.WORLD, cpu),
                           BlockTables() if announced else None)]
    tables = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

    def table(i: int, first: bool) -> dict:
        if announced:
            return {"new_blocks": tables[i] if first else []}
        return {"new_blocks": [], "block_table": tables[i]}
    chunks = [SequenceChunk(i, 0, 0, p, sample=True, **table(i, True)) for i, p in enumerate(PROMPTS)]
    logits = []
    for step in range(4):
        plan = StepPlan([MicroBatch(chunks)])
        outs = [w.run(plan).clone() for w in workers]
        logits.append(outs)
        tokens = outs[1].argmax(-1)
        for w in workers:
            w.feed.publish(tokens)
        # Every next decode token is fed from this step's sampled tokens, still "on the device".
        chunks = [SequenceChunk(i, 0, c.end, [0], sample=True, feed=i, **table(i, False))
                  for i, c in enumerate(chunks)]
    return logits, workers[0].graph_steps


@pytest.mark.parametrize("announced", [True, False], ids=["block-tables", "hand-built-lists"])
def test_decode_graph_plumbing_matches_eager(tiny_model, announced):
    logits, graph_steps = run_ranks(_compare, 1, str(tiny_model.canonical_dir), announced)
    assert graph_steps == 3  # the prefill step runs eagerly, the three decode steps from the graphs
    for graphed, eager in logits:
        assert graphed.shape == eager.shape == (3, eager.shape[1])
        assert torch.allclose(graphed, eager, atol=1e-4, rtol=0), (graphed - eager).abs().max()
