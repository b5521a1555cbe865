"""A step plan as integer columns: what `broadcast_plan` (control_plane.py) sends every step.

Every field a plan sends is an integer (or a flag), so the plan travels as one flat int64
array instead of a pickled tree of dataclasses: a header, then one column per chunk field,
the chunk count of each micro-batch, the released request ids, the host tier's copies
(offloads, loads), and every chunk's tokens and new blocks end to end. Encoding is one pass
over the chunks (`np.fromiter`); decoding slices the columns, and the received micro-batches
build their chunks back from them when asked, one request shard at a time (an attention rank
builds only its own shard's: plan.MicroBatch). Fields that are never sent (`block_table`,
`table_row`: each rank's own, worker/block_tables.py) are left out, as pickling left them.
A field added to `SequenceChunk` or `StepPlan` must be added here: the round-trip test
(tests/test_plan_columns.py) compares the fields to this module's lists.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from megatron_lamina.plan import MicroBatch, SequenceChunk, StepPlan

FORMAT = 2  # the first header value; a rank reading another format fails loudly
# Per chunk, in this order; tokens and new_blocks travel as their lengths here and their
# values after the columns.
CHUNK_FIELDS = ("request_id", "shard", "start", "tokens", "new_blocks", "sample", "feed", "all_logits")
PLAN_FIELDS = ("micro_batches", "released", "shutdown", "offloads", "loads")
NOT_SENT = ("block_table", "table_row")
HEADER = 8  # format, shutdown, micro-batches, chunks, released, tokens, offloads, loads


def encode(plan: StepPlan) -> np.ndarray:
    """The plan as one int64 array."""
    chunks = [c for mb in plan.micro_batches for c in mb.chunks]
    n = len(chunks)
    columns = np.fromiter(itertools.chain.from_iterable(
        (c.request_id, c.shard, c.start, len(c.tokens), len(c.new_blocks), c.sample, c.feed, c.all_logits)
        for c in chunks), np.int64, n * len(CHUNK_FIELDS)).reshape(n, len(CHUNK_FIELDS)).T
    num_tokens = int(columns[3].sum())
    tokens = np.fromiter(itertools.chain.from_iterable(c.tokens for c in chunks), np.int64, num_tokens)
    new_blocks = np.fromiter(itertools.chain.from_iterable(c.new_blocks for c in chunks), np.int64,
                             int(columns[4].sum()))
    header = [FORMAT, int(plan.shutdown), len(plan.micro_batches), n, len(plan.released), num_tokens,
              len(plan.offloads), len(plan.loads)]
    return np.concatenate([np.asarray(header, np.int64), columns.reshape(-1),
                           np.fromiter((len(mb.chunks) for mb in plan.micro_batches), np.int64),
                           np.asarray(plan.released, np.int64), np.asarray(plan.offloads, np.int64),
                           np.asarray(plan.loads, np.int64), tokens, new_blocks])


def decode(flat: np.ndarray) -> StepPlan:
    """`encode`'s plan back (without the fields that are never sent). Its micro-batches make
    their chunk objects from the columns when first asked for (plan.MicroBatch), so they keep
    views of `flat`: a buffer the caller does not reuse."""
    fmt, shutdown, num_mbs, n, num_released, num_tokens, num_offloads, num_loads = flat[:HEADER].tolist()
    if fmt != FORMAT:
        raise ValueError(f"a step plan in format {fmt}, this rank reads format {FORMAT}: "
                         "every rank must run the same version of megatron-lamina")
    at = HEADER
    table = flat[at:at + n * len(CHUNK_FIELDS)].reshape(len(CHUNK_FIELDS), n)
    at += table.size
    per_mb = flat[at:at + num_mbs].tolist()
    at += num_mbs
    released = flat[at:at + num_released].tolist()
    at += num_released
    offloads = flat[at:at + num_offloads].tolist()
    at += num_offloads
    loads = flat[at:at + num_loads].tolist()
    at += num_loads
    columns = _Columns(table, flat[at:at + num_tokens], flat[at + num_tokens:])
    assert len(columns.new_blocks) == columns.block_ends[-1], "a step plan's columns do not add up"
    shards, sizes = table[1].tolist(), table[3].tolist()
    mbs, first = [], 0
    for count in per_mb:
        mbs.append(MicroBatch(shards=shards[first:first + count], sizes=sizes[first:first + count],
                              build=functools.partial(columns.chunks, first)))
        first += count
    return StepPlan(mbs, released, bool(shutdown), offloads, loads)


class _Columns:
    """A received plan's chunk columns, and the chunk objects of any range of them."""

    def __init__(self, table: np.ndarray, tokens: np.ndarray, new_blocks: np.ndarray):
        self.table = table  # [len(CHUNK_FIELDS), chunks]
        self.tokens, self.new_blocks = tokens, new_blocks  # every chunk's, end to end
        self.token_ends = np.concatenate([[0], np.cumsum(table[3])]).tolist()
        self.block_ends = np.concatenate([[0], np.cumsum(table[4])]).tolist()

    def chunks(self, first: int, lo: int, hi: int) -> list[SequenceChunk]:
        """Chunks first+lo .. first+hi-1: their tokens and new blocks cut from the flat lists in
        order (a decode chunk: one token, mostly no block), built by one map over the columns."""
        a, b = first + lo, first + hi
        request_ids, shards, starts, token_counts, block_counts, samples, feeds, all_logits = \
            self.table[:, a:b].tolist()
        tokens = self.tokens[self.token_ends[a]:self.token_ends[b]].tolist()
        if len(tokens) == b - a:
            chunk_tokens = [[t] for t in tokens]
        else:
            rest = iter(tokens)
            chunk_tokens = [list(itertools.islice(rest, c)) for c in token_counts]
        rest = iter(self.new_blocks[self.block_ends[a]:self.block_ends[b]].tolist())
        chunk_blocks = [list(itertools.islice(rest, c)) if c else [] for c in block_counts]
        return list(map(SequenceChunk, request_ids, shards, starts, chunk_tokens, chunk_blocks, map(bool, samples),
                        feeds, map(bool, all_logits)))
