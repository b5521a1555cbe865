"""The time of one engine step, from the per-layer costs of its micro-batches (DESIGN.md s. 4).

Disaggregated: `ModelWorker.run` walks the engine's one rotation (worker/rotation.py's
`exchange_order`, which this model walks too), layer-major: (mb 0, layer 0), (mb 1, layer 0),
.., (mb n-1, layer 0), (mb 0, layer 1), ..
The model worker is one serial resource; each resumption of micro-batch j at layer l first
waits for j's attention output of layer l-1, then runs j's model work and sends q, k, v
(`model_s` = post-attention of layer l-1 plus pre-attention of layer l; we book a layer's
whole model time before its attention, so the first resumption costs M_j and the last one,
after layer L-1's attention, costs nothing here: the LM head is in the step overhead). Each
attention worker (one per request shard; head groups of a shard run in lock-step, their
share is already in `attention_s`) is another serial resource, visiting the micro-batches
with rows on its shard in the same order. The network is a pure delay each way (`send_s`,
`reply_s`; transfers of different messages may overlap).

`disaggregated_step_time` plays that precedence graph exactly, layer by layer; since every
layer of a step is identical, once a whole layer shifts every clock by the same amount the
remaining layers are added in one multiplication (the max-plus recurrence has become
periodic), so a step costs a few layers of Python, not L.

For n identical micro-batches on one shard (M model, A attention, N = send + reply) the
longest path through that graph, i.e. the step time, is exactly

    max( L*n*M + A + N,                      all model work, plus the one round trip
                                             before micro-batch n-1's last output
         L*n*A + M + N,                      all attention work, plus the first model
                                             slot and one round trip
         L*(M + A + N) + (n-1)*max(M, A) )   micro-batch 0's chain of L round trips,
                                             plus the stagger of the other n-1

(`uniform_step_time`; tests/test_planner_pipeline.py checks it against the event replay).
Per layer that tends to max(n*M, n*A, M + A + N): the pipeline hides the round trip when
n*max(M, A) >= M + A + N. Colocated: attention runs inside the model worker's slot, nothing
overlaps: L * sum_j (M_j + A_j).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_lamina.worker.rotation import exchange_order


@dataclass
class ShardWork:
    """One micro-batch's rows on one request shard, per layer."""

    shard: int
    attention_s: float
    send_s: float = 0.0
    reply_s: float = 0.0


@dataclass
class MicroBatchCost:
    model_s: float                                   # model-worker time per layer
    shards: list[ShardWork] = field(default_factory=list)


def colocated_step_time(layers: int, micro_batches: list[MicroBatchCost]) -> float:
    return layers * sum(mb.model_s + sum(w.attention_s for w in mb.shards) for mb in micro_batches)


def disaggregated_step_time(layers: int, micro_batches: list[MicroBatchCost], fast_forward: bool = True) -> float:
    """Makespan of `layers` layers of the staggered pipeline (module docstring);
    `fast_forward=False` replays every layer (the tests' reference)."""
    n = len(micro_batches)
    if n == 0 or layers == 0:
        return 0.0
    shards = sorted({w.shard for mb in micro_batches for w in mb.shards})
    model_free = 0.0
    attention_free = {s: 0.0 for s in shards}
    output_at = [0.0] * n         # when micro-batch j's attention output of the last layer is back
    previous = [model_free, *attention_free.values(), *output_at]
    for layer, j in exchange_order(n, layers):  # the engine's own rotation (worker/rotation.py)
        mb = micro_batches[j]
        model_free = max(model_free, output_at[j]) + mb.model_s
        back = model_free
        for w in mb.shards:
            done = max(attention_free[w.shard], model_free + w.send_s) + w.attention_s
            attention_free[w.shard] = done
            back = max(back, done + w.reply_s)
        output_at[j] = back
        if j < n - 1:
            continue
        state = [model_free, *attention_free.values(), *output_at]
        deltas = [a - b for a, b in zip(state, previous)]
        if fast_forward and max(deltas) - min(deltas) <= 1e-12 * max(1.0, abs(model_free)):
            # This layer moved every clock by the same amount, so will every later one (the
            # next layer depends on nothing but these clocks).
            remaining = layers - 1 - layer
            model_free += remaining * deltas[0]
            output_at = [t + remaining * deltas[0] for t in output_at]
            break
        previous = state
    return max(model_free, *output_at)


def uniform_step_time(layers: int, n: int, model_s: float, attention_s: float, network_s: float) -> float:
    """Closed form of `disaggregated_step_time` for n identical micro-batches on one shard;
    `network_s` is the round trip (send + reply)."""
    m, a, net = model_s, attention_s, network_s
    return max(layers * n * m + a + net,
               layers * n * a + m + net,
               layers * (m + a + net) + (n - 1) * max(m, a))
