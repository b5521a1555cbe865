"""Every cache-holding rank's persistent block-table array (engine/block_tables.py), fed only
the plans' deltas by a real scheduler that admits, grows, preempts and finishes requests on
two shards of a tiny cache: every step, every rank's rows equal the driver's own tables, the
padded gather equals the one built from the lists, and the GPU attention index built from
the gather equals the one built from the lists (its host side needs no GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_lamina.attention.kv_cache import PagedKVCache, padded_block_tables
from megatron_lamina.engine.block_manager import BlockManager
from megatron_lamina.engine.block_tables import BlockTables, padded_tables
from megatron_lamina.engine.request import Request
from megatron_lamina.engine.sampling import SamplingParams
from megatron_lamina.engine.scheduler import Scheduler
from megatron_lamina.plan import SequenceChunk


def scheduled_plans(steps: int = 80):
    """(plan, the driver's table of every chunk) for each step of a small, crowded run."""
    scheduler = Scheduler(BlockManager(2, num_blocks=10, block_size=4), 6, 9, 2, max_model_len=256)
    rng = np.random.default_rng(0)
    for i in range(14):
        prompt = [1 + int(t) for t in rng.integers(0, 50, int(rng.integers(1, 14)))]
        scheduler.add(Request(i, prompt, SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 12)))))
    for _ in range(steps):
        plan = scheduler.schedule()
        by_id = {r.request_id: r for r in scheduler.running}
        yield plan, [list(by_id[c.request_id].block_table) for mb in plan.micro_batches for c in mb.chunks]
        for c in plan.sampled_chunks:
            request = by_id[c.request_id]
            request.output_token_ids.append(7)
            if len(request.output_token_ids) >= request.params.max_tokens:
                scheduler.finish(request, "length")
    assert scheduler.num_preemptions > 0 and not scheduler.has_work()


def test_rows_follow_the_deltas_on_every_rank():
    ranks = [BlockTables(rows=1, max_blocks=1), BlockTables(shard=0, rows=2, max_blocks=2), BlockTables(shard=1)]
    cache = PagedKVCache(1, 10, 4, 1, 8, torch.float32)
    for plan, driver_tables in scheduled_plans():
        chunks = [c for mb in plan.micro_batches for c in mb.chunks]
        for tables in ranks:
            tables.apply(plan)
            mine = [(c, t) for c, t in zip(chunks, driver_tables) if tables.shard in (None, c.shard)]
            for c, table in mine:
                assert c.block_table.tolist() == table and c.table_row[0] is tables
            served = [c for c, _ in mine]
            want = padded_block_tables([t for _, t in mine], 99)
            np.testing.assert_array_equal(padded_tables(served, 99), want)
            if tables.shard is not None:
                assert_same_index(served, [t for _, t in mine], cache)
        # Rows of ended requests are given back, and reused: the array stays the batch's size.
        assert len(ranks[0].row_of) <= 6 and ranks[0].array.shape[0] <= 8


def assert_same_index(chunks: list[SequenceChunk], lists: list[list[int]], cache: PagedKVCache):
    """PagedAttention's index from the gathered rows equals its index from hand-built lists."""
    from megatron_lamina.attention.gpu import PagedAttention

    by_hand = [SequenceChunk(c.request_id, c.shard, c.start, c.tokens, [], c.sample, block_table=t)
               for c, t in zip(chunks, lists)]
    got, want = PagedAttention(cache).host_index(chunks), PagedAttention(cache).host_index(by_hand)
    assert got.arrays.keys() == want.arrays.keys()
    for name in got.arrays:
        np.testing.assert_array_equal(got.arrays[name], want.arrays[name], err_msg=name)


def test_a_row_reused_after_release_shows_none_of_its_old_blocks():
    from megatron_lamina.plan import MicroBatch, StepPlan

    tables = BlockTables(rows=1, max_blocks=4)
    long = SequenceChunk(1, 0, 0, [5] * 16, [3, 4, 5, 6], True)
    tables.apply(StepPlan([MicroBatch([long])]))
    short = SequenceChunk(2, 0, 0, [5], [8], True)
    tables.apply(StepPlan([MicroBatch([short])], released=[1]))
    assert tables.row_of == {2: 0}
    np.testing.assert_array_equal(padded_tables([short], -1), [[8]])
    other = SequenceChunk(3, 0, 0, [5] * 8, [1, 2], True)
    tables.apply(StepPlan([MicroBatch([SequenceChunk(2, 0, 1, [6], [], True), other])]))
    np.testing.assert_array_equal(padded_tables([short, other], -1), [[8, -1], [1, 2]])


@pytest.mark.parametrize("hand_built", [[[4, 5], [6]], [[]]])
def test_hand_built_chunks_take_the_list_copy(hand_built):
    chunks = [SequenceChunk(i, 0, 0, [1], [], True, block_table=t) for i, t in enumerate(hand_built)]
    np.testing.assert_array_equal(padded_tables(chunks, 0), padded_block_tables(hand_built, 0))
