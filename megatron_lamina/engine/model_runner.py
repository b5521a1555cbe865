"""Model-worker side of a step: the staggered pipeline over micro-batches (DESIGN.md section 4).

Each micro-batch's forward pass is a generator (`LlamaModel.forward_micro_batch`) that
pauses after handing a layer's q, k, v to the attention channel. `run` resumes them in a
fixed rotation (micro-batch 0, 1, .., n-1, then 0 again), so while micro-batch m's attention
is away the model worker computes micro-batch m+1; the order depends only on the plan,
never on timing, which keeps TP collectives and P2P messages matched on every rank.
"""

from __future__ import annotations

import torch

from megatron_lamina.model.llama import LlamaModel
from megatron_lamina.plan import StepPlan


class ModelRunner:
    def __init__(self, model: LlamaModel, graphs=None):
        self.model = model
        self.graphs = graphs  # DecodeGraphs (cuda_graphs.py), colocated on a GPU only

    def run(self, plan: StepPlan) -> torch.Tensor:
        """Logits [sampled chunks of the plan, vocab], in `plan.sampled_chunks` order."""
        if self.graphs is not None and self.graphs.can_run(plan):
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
