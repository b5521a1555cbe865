"""Step plans for the benchmark and profiling tools: steps built by hand, not by the scheduler.

A benchmark times one kind of step at one size: `decode_plan` is `batch` requests each at
`context` cached tokens decoding one token (every request on its own consecutive blocks of
one cache when `block_size` is given; without it, no block tables: the attention is a
stand-in), dealt into `micro_batches` contiguous micro-batches; `paged_chunks` lays out
arbitrary (start, tokens) chunks over consecutive blocks, as an attention kernel reads them;
`announced` is the first such plan for a rank that keeps its own copy of the block tables.
Token values do not matter (random weights); they stay below 103, inside any vocabulary.
"""

from __future__ import annotations

import math

from megatron_lamina.plan import MicroBatch, SequenceChunk, StepPlan


def blocks_for(tokens: int, block_size: int) -> int:
    return math.ceil(tokens / block_size)


def paged_chunks(specs: list[tuple[int, list[int]]], block_size: int) -> list[SequenceChunk]:
    """One sampled chunk per (start, tokens) of request shard 0, each request on its own
    consecutive blocks (0, 1, .. for the first) covering its context after the chunk."""
    chunks, first = [], 0
    for i, (start, tokens) in enumerate(specs):
        count = blocks_for(start + len(tokens), block_size)
        chunks.append(SequenceChunk(i, 0, start, tokens, [], True, block_table=list(range(first, first + count))))
        first += count
    return chunks


def decode_plan(batch: int, context: int, block_size: int | None = None, micro_batches: int = 1) -> StepPlan:
    """`batch` decode rows at `context` cached tokens; with `block_size`, request i holds
    blocks [i * b, (i + 1) * b) of one cache (b = the blocks of context + 1 tokens), so the
    cache needs batch * b blocks."""
    tokens = [[3 + i % 100] for i in range(batch)]
    if block_size is None:
        chunks = [SequenceChunk(i, 0, context, tokens[i], [], True) for i in range(batch)]
    else:
        chunks = paged_chunks([(context, t) for t in tokens], block_size)
    per = -(-batch // micro_batches)
    return StepPlan([MicroBatch(chunks[i:i + per]) for i in range(0, batch, per)])


def announced(plan: StepPlan) -> StepPlan:
    """The same step with each chunk's whole table as its `new_blocks`: the first plan a rank
    that keeps its own block tables (an attention worker, worker/block_tables.py) must see;
    `plan` itself, which adds no blocks, is then every later step on that rank."""
    return StepPlan([MicroBatch([SequenceChunk(c.request_id, c.shard, c.start, c.tokens, list(c.block_table), c.sample,
                                               c.feed, block_table=list(c.block_table)) for c in mb.chunks])
                     for mb in plan.micro_batches])
