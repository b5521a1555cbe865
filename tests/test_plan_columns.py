"""Step plans as integer columns (worker/plan_columns.py): every field a plan sends survives
the round trip (chunks of prefill and decode, fed tokens, prompt log-probabilities, new
blocks, released requests, host-tier copies, several micro-batches and shards, the heartbeat's empty plan,
the shutdown plan), the encoder knows every field of the plan's dataclasses, and
`broadcast_plan` carries them between real gloo ranks."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
from spawn_ranks import run_ranks

from megatron_lamina.worker import plan_columns
from megatron_lamina.plan import MicroBatch, SequenceChunk, StepPlan


def plans() -> list[StepPlan]:
    rng = np.random.default_rng(3)
    big = [SequenceChunk(i, i // 400, int(rng.integers(0, 9000)), [int(rng.integers(0, 150_000))],
                         [int(rng.integers(0, 10**6))] if i % 16 == 0 else [], True, feed=i if i % 3 else -1)
           for i in range(1024)]
    return [
        StepPlan(),  # a heartbeat
        StepPlan(shutdown=True),
        StepPlan([MicroBatch([SequenceChunk(7, 0, 0, [1, 2, 3], [4, 5], False)])], released=[2, 9]),
        StepPlan([MicroBatch([SequenceChunk(3, 0, 5, [0], [], True, feed=2),
                              SequenceChunk(2**40, 1, 0, list(range(17)), [8, 9, 10], True, all_logits=True)]),
                  MicroBatch([SequenceChunk(4, 1, 2, [11, 12], [], True, -1, True)])],
                 released=[5], offloads=[1, 7, 0, 1, 3, 2], loads=[0, 9, 4]),
        StepPlan([MicroBatch(big[:512]), MicroBatch(big[512:])], released=list(range(40))),
    ]


@pytest.mark.parametrize("plan", plans(), ids=["heartbeat", "shutdown", "prefill", "mixed", "1024-decode"])
def test_every_field_survives_the_round_trip(plan):
    flat = plan_columns.encode(plan)
    assert flat.dtype == np.int64 and flat.ndim == 1
    back = plan_columns.decode(flat)
    assert back == plan
    for mb_back, mb in zip(back.micro_batches, plan.micro_batches):
        for a, b in zip(mb_back.chunks, mb.chunks):
            assert [type(getattr(a, f)) for f in plan_columns.CHUNK_FIELDS] == \
                [type(getattr(b, f)) for f in plan_columns.CHUNK_FIELDS]


def test_the_columns_name_every_field_of_a_plan():
    """A field added to the plan must be sent (or named as never sent) here."""
    chunk_fields = {f.name for f in dataclasses.fields(SequenceChunk)}
    assert chunk_fields == set(plan_columns.CHUNK_FIELDS) | set(plan_columns.NOT_SENT)
    assert {f.name for f in dataclasses.fields(StepPlan)} == set(plan_columns.PLAN_FIELDS)
    # A micro-batch is its chunks (or, received, the same chunks as columns, made on demand).
    assert list(inspect.signature(MicroBatch).parameters) == ["chunks", "shards", "sizes", "build"]


def test_a_received_micro_batch_makes_only_the_chunks_asked_for():
    """An attention rank asks for its shard's chunks: the other shard's are never made; rows
    and chunks are those of the sent micro-batch, and a chunk is made once (one object, whichever
    way it is asked for: a rank's block tables annotate the objects its index then reads)."""
    plan = plans()[3]
    back = plan_columns.decode(plan_columns.encode(plan))
    for mb_back, mb in zip(back.micro_batches, plan.micro_batches):
        assert mb_back.num_rows == mb.num_rows
        assert [mb_back.shard_rows(s) for s in range(3)] == [mb.shard_rows(s) for s in range(3)]
    first = back.micro_batches[0]
    ones = first.shard_chunks(1)
    assert ones == plan.micro_batches[0].shard_chunks(1) and list(first._made) == [1]
    assert first.shard_chunks(1) is ones and first.shard_chunks(2) == [] and list(first._made) == [1, 2]
    assert first.chunks == plan.micro_batches[0].chunks and first.chunks[1] is ones[0]


def test_another_format_is_refused():
    flat = plan_columns.encode(StepPlan())
    flat[0] = plan_columns.FORMAT + 1
    with pytest.raises(ValueError, match="same version"):
        plan_columns.decode(flat)


def _broadcast_every_plan() -> int:
    import torch.distributed as dist

    from megatron_lamina.worker.control_plane import broadcast_plan
    from megatron_lamina.topology import ProcessGroups

    dist.init_process_group("gloo")
    groups = ProcessGroups(tp=None, control=dist.group.WORLD, startup=dist.group.WORLD)
    for plan in plans():
        if dist.get_rank() == 0:
            assert broadcast_plan(plan, groups) is plan
        else:
            got = broadcast_plan(None, groups)
            assert got == plan, "a plan changed on its way"
    dist.barrier()
    return len(plans())


def test_broadcast_plan_between_gloo_ranks():
    assert run_ranks(_broadcast_every_plan, 3) == len(plans())
