"""Model-worker side of a step: inputs to the device, then the pipeline over the micro-batches.

`ModelWorker.run(plan)` returns the logits of the plan's sampled chunks (in
`plan.sampled_chunks` order, gathered over the vocabulary on every TP rank). It copies the
step's inputs (token ids with the fed rows, positions, sampled rows, and the attention index
of a colocated worker) to the device in one transfer, then takes the fastest executor that
fits the plan:
  * `DecodeGraphs` (colocated, one micro-batch of decode tokens): the whole step is one
    replay (cuda_graphs.py);
  * `StageGraphs` (any step whose micro-batches fit the captured token buckets and slots):
    the stages between attention calls are replays, attention runs through the channel
    (stage_graphs.py);
  * otherwise the eager stages (CPU, `runtime.cuda_graphs: false`, or a step too large).
Both pipelines follow the one rotation (rotation.py, pipeline.py). A rank that is not the
driver receives the step's sampled tokens from it afterwards (`TokenFeed`), for the next
step's fed rows; every colocated one keeps its own copy of the block tables (`BlockTables`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_lamina.worker.block_tables import BlockTables
from megatron_lamina.worker.host_tier import HostTier
from megatron_lamina.worker.pipeline import EagerStages, run_pipeline
from megatron_lamina.worker.stage_graphs import StageGraphs
from megatron_lamina.worker.step_inputs import host_inputs
from megatron_lamina.worker.token_feed import TokenFeed
from megatron_lamina.host_to_device import HostArrays, to_device
from megatron_lamina.model.llama import LlamaModel
from megatron_lamina.plan import StepPlan
from megatron_lamina.transport.channel import AttentionChannel

if TYPE_CHECKING:  # the decode graphs' module brings Triton's kernels, which only a GPU rank imports
    from megatron_lamina.worker.cuda_graphs import DecodeGraphs


class ModelWorker:
    def __init__(self, model: LlamaModel, channel: AttentionChannel, feed: TokenFeed,
                 tables: BlockTables | None = None, decode_graphs: DecodeGraphs | None = None,
                 stage_graphs: StageGraphs | None = None, host_tier: HostTier | None = None):
        """`tables`: this rank's copy of the block tables (every colocated rank, the driver's
        included: the attention index gathers its rows); None where no cache is held.
        `host_tier`: the prefix cache's host copies of this rank's cache (colocated), if any."""
        self.model, self.channel, self.feed, self.tables = model, channel, feed, tables
        self.host_tier = host_tier
        self.decode_graphs, self.stage_graphs = decode_graphs, stage_graphs
        self.graph_steps = 0  # steps replayed from graphs (tests check that the graph path ran)

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        if self.host_tier is not None:  # the prefix cache's copies, before anything reads the cache
            self.host_tier.apply(plan)
        # The block-table mirror's writes go first in the step's copy: the indices gather from it.
        table_writes = HostArrays({}) if self.tables is None else self.tables.apply(plan)
        if self.decode_graphs is not None and self.decode_graphs.can_run(plan):
            self.graph_steps += 1
            return self.decode_graphs.run(plan, self.feed.last, table_writes)
        mbs = plan.micro_batches
        sets = [table_writes] + [host_inputs(mb, self.feed.last) for mb in mbs] + [self.channel.prepare(mb) for mb in mbs]
        staged = to_device(sets, self.model.device)
        inputs, contexts = staged[1:len(mbs) + 1], staged[len(mbs) + 1:]
        if self.stage_graphs is not None and self.stage_graphs.can_run(plan):
            self.graph_steps += 1
            stages = self.stage_graphs.stages()
        else:
            stages = EagerStages(self.model)
        logits = run_pipeline(stages, self.channel, inputs, contexts, self.model.num_layers)
        if not logits:
            return torch.empty(0, self.model.arch.vocab_size, device=self.model.device)
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def serve(self, plan: StepPlan) -> None:
        """A rank that is not the driver: run the step, then take its sampled tokens."""
        self.run(plan)
        self.feed.receive(plan.num_sampled)
