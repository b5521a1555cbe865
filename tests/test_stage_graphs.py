"""`StageGraphs`' plumbing on CPU, where no CUDA graph can be captured.

The graphs are replaced by stand-ins that run the captured stage's code at replay over the
slot's static tensors, so everything around the graphs is the real thing: token buckets and
padding rows, one slot of static tensors per micro-batch, the residual stream and RoPE
tables carried from stage to stage, the attention output copied in, the eager head over the
sampled rows of decode and prefill chunks. Against the eager stages (`ModelWorker` without
graphs): the same logits, and the same channel calls in the same order with the same rows
(padding never sent). The graphs themselves run in tests/test_gpu.py.
"""

from __future__ import annotations

import torch
from spawn_ranks import run_ranks

from megatron_lamina.host_to_device import HostArrays
from megatron_lamina.plan import MicroBatch, SequenceChunk, StepPlan


def _decode(sizes: list[int], first_id: int = 0) -> StepPlan:
    mbs, rid = [], first_id
    for n in sizes:
        mbs.append(MicroBatch([SequenceChunk(rid + i, 0, 3 + 7 * (rid + i) % 50, [(rid + i) * 13 % 90 + 1], [], True)
                               for i in range(n)]))
        rid += n
    return StepPlan(mbs)


PLANS = [
    _decode([3]),            # bucket 4 with a padding row
    _decode([4, 3]),         # two slots, one padded
    _decode([1, 1], 10),
    _decode([5], 20),        # bucket 8
    _decode([4, 3], 30),     # the slots captured above, new rows
    _decode([2, 2, 2]),      # more micro-batches than slots: eager
    StepPlan([MicroBatch([SequenceChunk(0, 0, 0, [1, 2, 3], [], True)])]),  # a prefill chunk, bucket 4
    StepPlan([MicroBatch([SequenceChunk(0, 0, 0, [1, 2, 3, 4, 5], [], False),  # mixed: 7 rows, 2 sampled
                          SequenceChunk(1, 0, 9, [7], [], True), SequenceChunk(2, 0, 2, [8], [], True)])]),
    StepPlan([MicroBatch([SequenceChunk(0, 0, 0, list(range(1, 12)), [], True)])]),  # 11 rows > 8: eager
]
GRAPH_STEPS = 7


def _eager_and_staged(checkpoint):
    import torch.distributed as dist

    from megatron_lamina.architecture import read_architecture
    from megatron_lamina.checkpoint.loader import CheckpointShardLoader
    from megatron_lamina.worker.model_worker import ModelWorker
    from megatron_lamina.worker.stage_graphs import StageGraphs
    from megatron_lamina.worker.token_feed import TokenFeed
    from megatron_lamina.model.llama import LlamaModel
    from megatron_lamina.transport.channel import LocalChannel

    class StandInGraph:
        """A CUDA graph's stand-in: replay runs the stage over the slot's static tensors."""

        def __init__(self, slot, model, stage, size):
            self.slot, self.model, self.stage, self.size = slot, model, stage, size

        def replay(self):
            self.slot.run_stage(self.model, self.stage, self.size)

    class StandInStageGraphs(StageGraphs):
        def capture(self, progress=None):
            for size in self.sizes:
                for slot in self.slots:
                    slot.graphs[size] = [StandInGraph(slot, self.model, s, size)
                                         for s in range(self.model.num_layers + 1)]

    calls = []

    class Attention:  # stands in for attention: depends on each row's q and v only
        def host_index(self, chunks):
            return HostArrays({}, lambda _: tuple(c.request_id for c in chunks))

        def __call__(self, layer, ids, q, k, v):
            calls.append((layer, ids, q.shape[0], k.shape[0], v.shape[0]))
            return torch.tanh(q) + v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)

    dist.init_process_group("gloo")
    arch = read_architecture(checkpoint)
    loader = CheckpointShardLoader(checkpoint, 0, 1, torch.float32)
    model = LlamaModel(arch, torch.float32, dist.group.WORLD, loader.padded_vocab_size)
    loader.load_into(model)
    out = {}
    graphs = StandInStageGraphs(model, max_tokens=8, slots=2)
    graphs.capture()
    for name, stage_graphs in (("eager", None), ("staged", graphs)):
        worker = ModelWorker(model, LocalChannel(Attention()), TokenFeed(dist.group.WORLD, torch.device("cpu")),
                             stage_graphs=stage_graphs)
        logits = [worker.run(plan) for plan in PLANS]
        out[name] = (logits, list(calls), worker.graph_steps)
        calls.clear()
    out["buckets"] = graphs.sizes
    return out


def test_stage_graph_plumbing_matches_eager(tiny_model):
    out = run_ranks(_eager_and_staged, 1, str(tiny_model.canonical_dir))
    eager_logits, eager_calls, eager_graph_steps = out["eager"]
    staged_logits, staged_calls, staged_graph_steps = out["staged"]
    assert eager_graph_steps == 0 and staged_graph_steps == GRAPH_STEPS
    assert out["buckets"] == [1, 2, 4, 8]
    assert staged_calls == eager_calls  # layer-major, micro-batch-minor, real rows only
    for plan, got, want in zip(PLANS, staged_logits, eager_logits):
        assert got.shape == want.shape == (plan.num_sampled, want.shape[1])
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
