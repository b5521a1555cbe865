"""Attention-worker side of a step: the mirror image of `ModelRunner`.

For every layer, for every micro-batch with rows on this worker's request shard (the same
layer-major rotation the model workers' generators follow), receive the q, k, v rows of this
worker's KV-head group, append k, v to the paged cache, attend, and send the output back.
"""

from __future__ import annotations

from megatron_lamina.attention.kv_cache import PagedKVCache
from megatron_lamina.attention.reference import attend_chunks
from megatron_lamina.plan import StepPlan
from megatron_lamina.transport.p2p import AttentionEndpoint


class AttentionRunner:
    def __init__(self, endpoint: AttentionEndpoint, cache: PagedKVCache, num_layers: int):
        self.endpoint, self.cache, self.num_layers = endpoint, cache, num_layers

    def run(self, plan: StepPlan) -> None:
        shard = self.endpoint.shard
        mine = [mb for mb in plan.micro_batches if mb.shard_chunks(shard)]
        for layer in range(self.num_layers):
            for mb in mine:
                q, k, v = self.endpoint.receive(mb)
                self.endpoint.reply(attend_chunks(self.cache, layer, mb.shard_chunks(shard), q, k, v))
        self.endpoint.drain()
