"""Attention-worker side of a step: the mirror image of the model worker's pipeline.

Before the step, the worker applies the plan to its copy of the block tables and builds the
attention index of each micro-batch with rows on its request shard (one host-to-device
copy). Then, for every exchange in `exchange_order` (rotation.py) whose micro-batch has rows
here, it receives the q, k, v rows of its KV-head group, appends k, v to the paged cache,
attends and sends the output back: exactly the order in which the model workers post them.

With q-first (runtime.q_first; transport/p2p.py sends q, then k, v) the worker takes q
first; if the micro-batch's chunks on this shard are all decode tokens it attends their
cached tokens while k, v are still travelling, then appends k, v and merges the new tokens'
terms by log-sum-exp (attention/lse_merge.py); a micro-batch with a prefill chunk waits for
k, v and takes the usual path.
"""

from __future__ import annotations

import torch

from megatron_lamina.worker.block_tables import BlockTables
from megatron_lamina.worker.host_tier import HostTier
from megatron_lamina.worker.rotation import exchange_order
from megatron_lamina.host_to_device import to_device
from megatron_lamina.plan import StepPlan
from megatron_lamina.transport.channel import AttentionBackend
from megatron_lamina.transport.p2p import AttentionEndpoint


class AttentionWorker:
    def __init__(self, endpoint: AttentionEndpoint, attend: AttentionBackend, num_layers: int, device,
                 tables: BlockTables, host_tier: HostTier | None = None):
        """`tables`: this rank's copy of its shard's block tables (with its mirror on `device`);
        `host_tier`: the prefix cache's host copies of its cache, if any."""
        self.endpoint, self.attend, self.num_layers, self.device = endpoint, attend, num_layers, device
        self.tables, self.host_tier = tables, host_tier

    @torch.inference_mode()
    def serve(self, plan: StepPlan) -> None:
        if self.host_tier is not None:  # the prefix cache's copies, before anything reads the cache
            self.host_tier.apply(plan)
        table_writes = self.tables.apply(plan)  # first in the copy: the indices gather from the mirror
        shard, mbs = self.endpoint.shard, plan.micro_batches
        here = {j: chunks for j, mb in enumerate(mbs) if (chunks := mb.shard_chunks(shard))}  # this shard's rows
        staged = to_device([table_writes] + [self.attend.host_index(chunks) for chunks in here.values()], self.device)
        indices = dict(zip(here, staged[1:]))
        decode_only = {j for j, chunks in here.items() if all(len(c.tokens) == 1 for c in chunks)}
        for layer, j in exchange_order(len(mbs), self.num_layers):
            if j not in indices:
                continue
            if not self.endpoint.q_first:
                self.endpoint.reply(self.attend(layer, indices[j], *self.endpoint.receive(mbs[j])))
                continue
            q, posted_kv = self.endpoint.receive_q(mbs[j])
            if j in decode_only:  # attend the cached tokens while k, v travel
                partial = self.attend.attend_cached(layer, indices[j], q)
                o = self.attend.append_and_merge(layer, indices[j], partial, q, *self.endpoint.receive_kv(posted_kv))
            else:
                o = self.attend(layer, indices[j], q, *self.endpoint.receive_kv(posted_kv))
            self.endpoint.reply(o)
        self.endpoint.drain()
