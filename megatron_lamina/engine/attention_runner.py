"""Attention-worker side of a step: the mirror image of `ModelRunner`.

For every layer, for every micro-batch with rows on this worker's request shard (the same
layer-major rotation the model workers' generators follow), receive the q, k, v rows of this
worker's KV-head group, append k, v to the paged cache, attend, and send the output back.
"""

from __future__ import annotations

from megatron_lamina.plan import StepPlan
from megatron_lamina.transport.channel import AttendFn
from megatron_lamina.transport.p2p import AttentionEndpoint


class AttentionRunner:
    def __init__(self, endpoint: AttentionEndpoint, attend: AttendFn, num_layers: int):
        self.endpoint, self.attend, self.num_layers = endpoint, attend, num_layers

    def run(self, plan: StepPlan) -> None:
        shard = self.endpoint.shard
        mine = [(mb, mb.shard_chunks(shard)) for mb in plan.micro_batches]
        mine = [(mb, chunks) for mb, chunks in mine if chunks]
        for layer in range(self.num_layers):
            for mb, chunks in mine:
                q, k, v = self.endpoint.receive(mb)
                self.endpoint.reply(self.attend(layer, chunks, q, k, v))
        self.endpoint.drain()
