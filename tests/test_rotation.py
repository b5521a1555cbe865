"""The one rotation (worker/rotation.py): for random plans, the model side's pipeline and the
attention workers' loop post exactly matching message sequences.

The model side is the real `run_pipeline` (worker/pipeline.py) over stages that only count,
with a channel that records, per attention worker, every exchange it would post (the routes
of topology.py: each request shard with rows, each KV-head group); the attention side is the
real `AttentionWorker.serve` with an endpoint that records what it receives. For every
worker the two sequences must be equal, exchange by exchange (layer, micro-batch, rows) —
a difference would be a deadlock on real ranks. Plans are drawn at random: 1-4 micro-batches,
requests on random shards (some micro-batches with no rows on some shards), prefill chunks
and decode tokens.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_lamina.worker.attention_worker import AttentionWorker
from megatron_lamina.worker.block_tables import BlockTables
from megatron_lamina.worker.pipeline import run_pipeline
from megatron_lamina.worker.step_inputs import MicroBatchInputs
from megatron_lamina.host_to_device import HostArrays
from megatron_lamina.plan import MicroBatch, SequenceChunk, StepPlan
from megatron_lamina.topology import Topology

LAYERS = 3


class CountingStages:
    def first(self, j, inputs):
        return self._qkv(inputs.num_rows)

    def middle(self, j, layer, attention_out):
        return self._qkv(attention_out.shape[0])

    def last(self, j, attention_out):
        return attention_out

    @staticmethod
    def _qkv(rows):
        return torch.zeros(rows, 1, 1), torch.zeros(rows, 1, 1), torch.zeros(rows, 1, 1)


class RecordingChannel:
    """The model worker's end: what it sends to each attention rank, in posting order."""

    def __init__(self, topology: Topology, tp_rank: int, log: dict):
        self.routes, self.log, self.layer = topology.routes_from_tp(tp_rank), log, {}

    def prepare(self, mb):
        return HostArrays({}, lambda _: mb)

    def begin(self, layer, mb, q, k, v):
        for route in self.routes:
            lo, hi = mb.shard_rows(route.shard)
            if lo < hi:
                self.log.setdefault(route.peer, []).append((layer, id(mb), lo, hi))
        return q

    def finish(self, pending):
        return pending


class RecordingEndpoint:
    q_first = False

    def __init__(self, shard: int, peer_log: list):
        self.shard, self.log, self.calls = shard, peer_log, {}

    def receive(self, mb):
        layer = self.calls.get(id(mb), 0)
        self.calls[id(mb)] = layer + 1
        self.log.append((layer, id(mb), *mb.shard_rows(self.shard)))
        return torch.zeros(1), torch.zeros(1), torch.zeros(1)

    def reply(self, o):
        pass

    def drain(self):
        pass


class NoAttention:
    def host_index(self, chunks):
        return HostArrays({})

    def __call__(self, layer, index, q, k, v):
        return q


def random_plan(rng: random.Random, shards: int) -> StepPlan:
    n = rng.randint(1, 4)
    mbs = []
    for j in range(n):
        chunks = [SequenceChunk(100 * j + i, rng.randrange(shards), rng.randrange(50),
                                [0] * (1 if rng.random() < 0.7 else rng.randint(2, 6)), [], True)
                  for i in range(rng.randint(1, 5))]
        mbs.append(MicroBatch(sorted(chunks, key=lambda c: c.shard)))
    return StepPlan(mbs)


@pytest.mark.parametrize("tp, workers, groups", [(1, 1, 1), (1, 3, 1), (2, 2, 2), (2, 4, 2), (1, 4, 2), (2, 2, 1),
                                                (4, 2, 2)])
def test_both_roles_post_the_same_exchanges(tp, workers, groups):
    topology = Topology(tp, groups, workers // groups, 4, workers)
    rng = random.Random(tp * 100 + workers * 10 + groups)
    for _ in range(30):
        plan = random_plan(rng, topology.request_shards)
        sent: dict[int, dict[int, list]] = {}  # TP rank -> attention rank -> exchanges
        for tp_rank in range(tp):  # every TP rank posts to the attention ranks of its heads
            inputs = [MicroBatchInputs(mb.num_rows, torch.zeros(mb.num_rows), torch.zeros(mb.num_rows), None)
                      for mb in plan.micro_batches]
            run_pipeline(CountingStages(), RecordingChannel(topology, tp_rank, sent.setdefault(tp_rank, {})),
                         inputs, plan.micro_batches, LAYERS)
        for rank in range(tp, tp + workers):
            _, shard = topology.attention_coords(rank)
            received: list = []
            worker = AttentionWorker(RecordingEndpoint(shard, received), NoAttention(), LAYERS, torch.device("cpu"),
                                     BlockTables(shard))
            worker.serve(plan)
            # Every TP rank with a route to this worker posts exactly what it receives (the
            # endpoint takes one message from each route per exchange).
            for route in topology.routes_to_attention(rank):
                assert sent[route.peer].get(rank, []) == received, (rank, route, plan)
            assert len(received) == LAYERS * sum(1 for mb in plan.micro_batches if mb.shard_chunks(shard))
