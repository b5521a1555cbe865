"""Model-worker side of a step: the staggered pipeline over micro-batches (DESIGN.md section 4).

Each micro-batch's forward pass is a generator (`LlamaModel.forward_micro_batch`) that
pauses after handing a layer's q, k, v to the attention channel. `run` resumes them in a
fixed rotation (micro-batch 0, 1, .., n-1, then 0 again), so while micro-batch m's attention
is away the model worker computes micro-batch m+1; the order depends only on the plan,
never on timing, which keeps TP collectives and P2P messages matched on every rank.

With CUDA graphs (on a GPU; at TP > 1 through NCCL) a step that qualifies replays them
instead: the whole colocated decode step (`DecodeGraphs`, cuda_graphs.py), or,
disaggregated, the stages between attention calls in the same rotation (`StageGraphs`,
stage_graphs.py).
"""

from __future__ import annotations

import torch

from megatron_lamina.model.llama import LlamaModel
from megatron_lamina.plan import StepPlan


class ModelRunner:
    def __init__(self, model: LlamaModel, graphs=None):
        self.model = model
        self.graphs = graphs  # DecodeGraphs (colocated) or StageGraphs (disaggregated), or None
        self.graph_steps = 0  # steps replayed from the graphs (tests check that the graph path ran)

    def run(self, plan: StepPlan) -> torch.Tensor:
        """Logits [sampled chunks of the plan, vocab], in `plan.sampled_chunks` order."""
        if self.graphs is not None and self.graphs.can_run(plan):
            self.graph_steps += 1
            return self.graphs.run(plan)
        passes = [self.model.forward_micro_batch(mb) for mb in plan.micro_batches]
        logits: list[torch.Tensor | None] = [None] * len(passes)
        active = list(range(len(passes)))
        while active:
            for i in list(active):
                try:
                    next(passes[i])
                except StopIteration as done:
                    logits[i] = done.value
                    active.remove(i)
        if not logits:
            return torch.empty(0, self.model.arch.vocab_size)
        return torch.cat(logits)
