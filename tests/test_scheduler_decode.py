"""The scheduler's decode steps, chunk by chunk (the real Scheduler and BlockManager, the
prefix cache on): every decode chunk is what its request's state says it must be, whether the
step plans it on the steady path (one token, its block already announced) or the general one
(a new block, a full block to register), with tokens read back at once or still on the device
(asynchronous scheduling); a decode step's chunks are dealt to the micro-batches in turn, as the
fewest-tokens rule deals one-token chunks; and a rank that receives the plans keeps the
driver's block tables."""

from __future__ import annotations

import pytest

from megatron_lamina.driver.block_manager import BlockManager
from megatron_lamina.driver.request import Request
from megatron_lamina.driver.scheduler import Scheduler
from megatron_lamina.requests.sampling_params import SamplingParams
from megatron_lamina.worker import plan_columns
from megatron_lamina.worker.block_tables import BlockTables

BLOCK = 4


def _decode_state(request: Request) -> tuple | None:
    """What a decode chunk of `request` must hold, read before the step is planned: (start,
    tokens, feed, blocks already sent); None if its next chunk is not one decode token."""
    outputs = len(request.output_token_ids) + request.num_pending
    if len(request.prompt_token_ids) + outputs - request.num_computed != 1 or not outputs:
        return None
    if request.num_pending:
        return request.num_computed, [0], request.feed_row, request.num_blocks_sent
    return request.num_computed, [request.output_token_ids[-1]], -1, request.num_blocks_sent


@pytest.mark.parametrize("in_flight", [False, True], ids=["read-back", "asynchronous"])
def test_every_decode_chunk_is_its_requests_next_token(in_flight):
    blocks = BlockManager(2, num_blocks=64, block_size=BLOCK)
    scheduler = Scheduler(blocks, max_batch_size=6, max_prefill_tokens=8, micro_batches=2, max_model_len=64)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]  # shared: later requests find its full blocks cached
    for i in range(6):
        scheduler.add(Request(i, prompt[:5 + i % 4] + [i], SamplingParams(max_tokens=12 + i, temperature=0)))
    receivers = [BlockTables(shard) for shard in (0, 1)]
    pending: list[Request] = []  # launched, its token not yet read back (asynchronous)
    decode_steps = steady = general = 0
    for step in range(40):
        before = {r.request_id: _decode_state(r) for r in scheduler.running}
        order = [r.request_id for r in scheduler.running]
        plan = scheduler.schedule()
        chunks = [c for mb in plan.micro_batches for c in mb.chunks]
        if not chunks:
            break
        by_id = {r.request_id: r for r in scheduler.running}
        for c in chunks:
            state = before.get(c.request_id)
            if state is None:
                continue  # a prefill chunk
            start, tokens, feed, sent = state
            request = by_id[c.request_id]
            assert (c.start, c.tokens, c.feed, c.sample, c.all_logits) == (start, tokens, feed, True, False)
            assert c.new_blocks == request.block_table[sent:] and c.block_table is request.block_table
            assert request.num_computed == start + 1 and request.num_blocks_sent == len(request.block_table)
            # The full blocks that steps planned before this one computed are cached now.
            assert request.num_registered == start // BLOCK
            steady += not c.new_blocks and start % BLOCK != 0
            general += bool(c.new_blocks)
        if all(len(c.tokens) == 1 for c in chunks) and {c.request_id for c in chunks} <= set(order):
            # One token each: the fewest-tokens rule deals them in turn in running order, then
            # each micro-batch is ordered by shard (admission order within one).
            decode_steps += 1
            planned = [rid for rid in order if rid in {c.request_id for c in chunks}]
            dealt = [sorted(planned[i::2], key=lambda rid: by_id[rid].shard) for i in range(2)]
            assert [[c.request_id for c in mb.chunks] for mb in plan.micro_batches] == dealt[:len(plan.micro_batches)]
        # Every rank that holds a shard's cache rebuilds the driver's tables from the plans.
        received = plan_columns.decode(plan_columns.encode(plan))
        for shard, tables in enumerate(receivers):
            tables.apply(received)
            for mb in received.micro_batches:
                for c in mb.shard_chunks(shard):
                    assert list(c.block_table) == by_id[c.request_id].block_table
        sampled = [by_id[c.request_id] for c in plan.sampled_chunks]
        # The engine's read-back: the step's tokens, at once or after the next step is planned.
        for request in pending:
            request.num_pending -= 1
            request.output_token_ids.append(10 + step)
        pending = []
        for row, request in enumerate(sampled):
            if in_flight:
                request.num_pending, request.feed_row = request.num_pending + 1, row
                pending.append(request)
            else:
                request.output_token_ids.append(10 + step)
        for request in list(scheduler.running):
            if not request.num_pending and len(request.output_token_ids) >= request.params.max_tokens:
                scheduler.finish(request, "length")
    assert decode_steps >= 5 and steady >= 20 and general >= 5  # both paths ran, many times
