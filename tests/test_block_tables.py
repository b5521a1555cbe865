"""Every cache-holding rank's persistent block-table array (worker/block_tables.py), fed only
the plans' deltas by a real scheduler that admits, grows, preempts and finishes requests on
two shards of a tiny cache: every step, every rank's rows equal the driver's own tables, the
rows gathered from the device mirror (the CPU stands in for the device) equal them too, and
the GPU attention index built from the mirror equals the one built from the lists (its host
side and its gathers need no GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_lamina.attention.kv_cache import PagedKVCache, padded_block_tables
from megatron_lamina.driver.block_manager import BlockManager
from megatron_lamina.worker.block_tables import BlockTables, ChunkTables
from megatron_lamina.driver.request import Request
from megatron_lamina.requests.sampling_params import SamplingParams
from megatron_lamina.driver.scheduler import Scheduler
from megatron_lamina.host_to_device import HostArrays, to_device
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


def gathered(tables: BlockTables, writes, chunks: list[SequenceChunk]) -> list[list[int]]:
    """The chunks' tables as the attention index gets them: the step's mirror writes copied
    (the CPU is the device here), then the rows gathered from the mirror, each cut to its
    row's length (entries past it are never read)."""
    index = ChunkTables.of(chunks)
    _, views = to_device([writes, HostArrays(index.host_arrays("t"))], torch.device("cpu"))
    rows = index.on_device(views, "t")
    assert rows.shape == (len(chunks), index.width)
    return [row[:len(c.block_table)].tolist() for row, c in zip(rows, chunks)]


def test_rows_follow_the_deltas_on_every_rank():
    ranks = [BlockTables(rows=1, max_blocks=1), BlockTables(shard=0, rows=2, max_blocks=2), BlockTables(shard=1)]
    cache = PagedKVCache(1, 10, 4, 1, 8, torch.float32)
    for plan, driver_tables in scheduled_plans():
        chunks = [c for mb in plan.micro_batches for c in mb.chunks]
        for tables in ranks:
            writes = tables.apply(plan)
            mine = [(c, t) for c, t in zip(chunks, driver_tables) if tables.shard in (None, c.shard)]
            for c, table in mine:
                assert c.block_table.tolist() == table and c.table_row[0] is tables
            served = [c for c, _ in mine]
            # Every step's writes reach the mirror: skipping none, its rows equal the driver's.
            assert gathered(tables, writes, served) == [t for _, t in mine]
            if tables.shard is not None:
                assert_same_index(served, [t for _, t in mine], cache)
        # Rows of ended requests are given back, and reused: the array stays the batch's size.
        assert len(ranks[0].row_of) <= 6 and ranks[0].array.shape[0] <= 8


def assert_same_index(chunks: list[SequenceChunk], lists: list[list[int]], cache: PagedKVCache):
    """PagedAttention's index from the mirror's rows equals its index from hand-built lists."""
    from megatron_lamina.attention.gpu import PagedAttention

    by_hand = [SequenceChunk(c.request_id, c.shard, c.start, c.tokens, [], c.sample, block_table=t)
               for c, t in zip(chunks, lists)]
    cpu = torch.device("cpu")
    [got], [want] = (to_device([PagedAttention(cache).host_index(x)], cpu) for x in (chunks, by_hand))
    for name in ("new_slots", "decode_rows", "context_lens", "max_context"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None and b is None) or torch.equal(torch.as_tensor(a), torch.as_tensor(b)), name
    lens = want.context_lens.tolist()
    for tables in (lambda i: i.block_tables, lambda i: i.prefill.block_tables if i.prefill else None):
        a, b = tables(got), tables(want)
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape
    decode = [t for c, t in zip(chunks, lists) if len(c.tokens) == 1]
    for row, (table, n) in enumerate(zip(decode, lens)):
        used = -(-n // cache.block_size)
        assert got.block_tables[row, :used].tolist() == table[:used]


def test_a_reused_row_reads_only_its_own_blocks():
    from megatron_lamina.plan import MicroBatch, StepPlan

    tables = BlockTables(rows=1, max_blocks=4)
    long = SequenceChunk(1, 0, 0, [5] * 16, [3, 4, 5, 6], True)
    writes = tables.apply(StepPlan([MicroBatch([long])]))
    assert gathered(tables, writes, [long]) == [[3, 4, 5, 6]]
    short = SequenceChunk(2, 0, 0, [5], [8], True)
    writes = tables.apply(StepPlan([MicroBatch([short])], released=[1]))
    assert tables.row_of == {2: 0} and gathered(tables, writes, [short]) == [[8]]
    other = SequenceChunk(3, 0, 0, [5] * 8, [1, 2], True)
    writes = tables.apply(StepPlan([MicroBatch([SequenceChunk(2, 0, 1, [6], [], True), other])]))
    assert gathered(tables, writes, [short, other]) == [[8], [1, 2]]


def test_the_mirror_is_rewritten_whole_after_the_array_grows():
    from megatron_lamina.plan import MicroBatch, StepPlan

    tables = BlockTables(rows=1, max_blocks=1)
    first = SequenceChunk(1, 0, 0, [5], [7], True)
    writes = tables.apply(StepPlan([MicroBatch([first])]))
    assert gathered(tables, writes, [first]) == [[7]]
    more = [SequenceChunk(1, 0, 1, [5] * 8, [9, 4], True), SequenceChunk(2, 0, 0, [5], [3], True)]
    writes = tables.apply(StepPlan([MicroBatch(more)]))
    assert "whole" in writes.arrays and tables.array.shape == (2, 3)
    assert gathered(tables, writes, more) == [[7, 9, 4], [3]]
    none = tables.apply(StepPlan([MicroBatch([SequenceChunk(2, 0, 1, [6], [], True)])]))
    assert none.arrays == {}


@pytest.mark.parametrize("hand_built", [[[4, 5], [6]], [[]]])
def test_hand_built_chunks_travel_as_padded_tables(hand_built):
    chunks = [SequenceChunk(i, 0, 0, [1], [], True, block_table=t) for i, t in enumerate(hand_built)]
    index = ChunkTables.of(chunks, 0)
    np.testing.assert_array_equal(index.host_arrays("t")["t"], padded_block_tables(hand_built, 0))
