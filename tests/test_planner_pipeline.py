"""The step-time model of the staggered pipeline (planner/pipeline.py): the event replay of
the model worker's rotation against its closed form, exactly.

Costs are small integers (seconds as floats), so every sum is exact and results compare
with ==.
"""

from __future__ import annotations

import random

import pytest

from megatron_lamina.planner.pipeline import (
    MicroBatchCost, ShardWork, colocated_step_time, disaggregated_step_time, uniform_step_time,
)


def uniform(n: int, model: float, attention: float, send: float, reply: float) -> list[MicroBatchCost]:
    return [MicroBatchCost(model, [ShardWork(0, attention, send, reply)]) for _ in range(n)]


# (layers, model, attention, send, reply): model-bound, attention-bound, round-trip-bound
REGIMES = {"model-bound": (32, 10.0, 3.0, 1.0, 1.0),
           "attention-bound": (32, 3.0, 10.0, 1.0, 1.0),
           "latency-bound": (32, 3.0, 4.0, 20.0, 20.0)}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_uniform_micro_batches_follow_the_closed_form(n, regime):
    layers, m, a, s, r = REGIMES[regime]
    step = disaggregated_step_time(layers, uniform(n, m, a, s, r))
    assert step == uniform_step_time(layers, n, m, a, s + r)
    # The three terms, spelled out for the regimes (docs/PLANNER.md):
    if n == 1:
        assert step == layers * (m + a + s + r)       # nothing to overlap with
    elif regime == "model-bound" and n * m >= m + a + s + r:
        assert step == layers * n * m + a + s + r     # the model worker never waits
    elif regime == "attention-bound" and n * a >= m + a + s + r:
        assert step == layers * n * a + m + s + r     # the attention worker never waits
    elif regime == "latency-bound":
        assert step == layers * (m + a + s + r) + (n - 1) * max(m, a)


def test_closed_form_over_random_costs():
    rng = random.Random(0)
    for _ in range(3000):
        layers, n = rng.randint(1, 12), rng.randint(1, 4)
        m, a, s, r = (float(rng.randint(0, 30)) for _ in range(4))
        mbs = uniform(n, m, a, s, r)
        expected = uniform_step_time(layers, n, m, a, s + r)
        assert disaggregated_step_time(layers, mbs) == expected
        assert disaggregated_step_time(layers, mbs, fast_forward=False) == expected


def test_fast_forward_is_exact_for_uneven_micro_batches_and_shards():
    """Mixed micro-batches over several request shards (some micro-batches missing a shard):
    the periodic shortcut equals replaying all layers."""
    rng = random.Random(1)
    for _ in range(2000):
        n, shards = rng.randint(1, 4), rng.randint(1, 3)
        mbs = []
        for _ in range(n):
            present = sorted(rng.sample(range(shards), rng.randint(1, shards)))
            mbs.append(MicroBatchCost(float(rng.randint(0, 20)),
                                      [ShardWork(s, float(rng.randint(0, 20)), float(rng.randint(0, 5)),
                                                 float(rng.randint(0, 5))) for s in present]))
        layers = rng.randint(1, 40)
        assert disaggregated_step_time(layers, mbs) == disaggregated_step_time(layers, mbs, fast_forward=False)


def test_colocated_is_serial():
    mbs = [MicroBatchCost(5.0, [ShardWork(0, 2.0)]), MicroBatchCost(3.0, [ShardWork(0, 1.0)])]
    assert colocated_step_time(10, mbs) == 10 * (5 + 2 + 3 + 1)
    assert colocated_step_time(10, uniform(3, 4.0, 6.0, 0.0, 0.0)) == 10 * 3 * (4 + 6)


def test_the_pipeline_hides_the_round_trip():
    """Per layer the step tends to max(n*M, n*A, M+A+N): with enough micro-batches the
    network costs nothing but one round trip per step."""
    layers, m, a, net = 80, 4.0, 4.0, 6.0
    one = disaggregated_step_time(layers, uniform(1, m, a, net / 2, net / 2))
    four = disaggregated_step_time(layers, uniform(4, m / 4, a / 4, net / 2, net / 2))  # same batch, split
    assert one == layers * (m + a + net)
    assert four == layers * (m / 4 + a / 4 + net) + 3 * max(m, a) / 4  # still latency-bound at n=4
    eight = disaggregated_step_time(layers, uniform(8, m, a, net / 2, net / 2))
    assert eight == layers * 8 * m + a + net  # 8 micro-batches of the full size: model-bound
