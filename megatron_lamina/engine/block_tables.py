"""Every cache-holding rank's own copy of the block tables, kept from the plans' deltas.

The driver's block manager owns the tables; a plan carries only what changed (each chunk's
`new_blocks`, and the requests whose blocks were `released`), so nothing proportional to the
context length crosses the control plane every step (plan.py). Every rank that holds a cache
(an attention worker, every colocated model worker, the driver's included) applies each plan
to its `BlockTables` before running it.

As vLLM V1's `BlockTable`: the tables live in one persistent `[rows, max blocks]` int32 numpy
array, one row per request, that `apply` writes the deltas into, so a step's host work is
proportional to what changed, not to batch x context. `apply` names each served chunk's row
(`chunk.table_row`) and sets `chunk.block_table` to a view of it; `padded_tables` then
builds a step's padded `[chunks, widest]` table with one numpy gather of those rows. The
array is not pinned: the step's one host-to-device copy stages the gathered rows through its
own pinned buffer (host_to_device.py), so the next plan may rewrite the array while that
copy is still in flight.
"""

from __future__ import annotations

import numpy as np

from megatron_lamina.attention.kv_cache import padded_block_tables
from megatron_lamina.plan import SequenceChunk, StepPlan


class BlockTables:
    def __init__(self, shard: int | None = None, rows: int = 64, max_blocks: int = 64):
        """`shard`: keep only that request shard's tables (an attention worker); None: all.
        `rows`, `max_blocks`: the array's first size; it doubles when a step needs more."""
        assert rows >= 1 and max_blocks >= 1
        self.shard = shard
        self.array = np.zeros((rows, max_blocks), np.int32)
        self.lengths = np.zeros(rows, np.int64)      # blocks in use in each row
        self.row_of: dict[int, int] = {}             # request id -> its row
        self._free = list(range(rows - 1, -1, -1))  # rows no request holds, the lowest last (popped first)

    def apply(self, plan: StepPlan) -> None:
        for request_id in plan.released:
            row = self.row_of.pop(request_id, None)
            if row is not None:
                self.lengths[row] = 0
                self._free.append(row)
        served = [c for mb in plan.micro_batches for c in mb.chunks if self.shard is None or c.shard == self.shard]
        for chunk in served:
            row = self.row_of.get(chunk.request_id)
            if row is None:
                row = self.row_of[chunk.request_id] = self._take_row()
            if chunk.new_blocks:
                start = int(self.lengths[row])
                end = start + len(chunk.new_blocks)
                if end > self.array.shape[1]:
                    self._grow(self.array.shape[0], max(end, 2 * self.array.shape[1]))
                self.array[row, start:end] = chunk.new_blocks
                self.lengths[row] = end
            chunk.table_row = (self, row)
        # Views only once every row is written: a growth above moved the array.
        for chunk in served:
            row = chunk.table_row[1]
            chunk.block_table = self.array[row, :self.lengths[row]]

    def gather(self, rows: np.ndarray, fill: int) -> np.ndarray:
        """[len(rows), widest of them (at least 1)] int32: their tables, then `fill`."""
        lengths = self.lengths[rows]
        width = max(int(lengths.max(initial=0)), 1)
        out = self.array[rows, :width]
        out[np.arange(width)[None, :] >= lengths[:, None]] = fill  # a row's earlier holder left blocks there
        return out

    def _take_row(self) -> int:
        if not self._free:
            rows = self.array.shape[0]
            self._grow(2 * rows, self.array.shape[1])
            self._free = list(range(2 * rows - 1, rows - 1, -1))
        return self._free.pop()

    def _grow(self, rows: int, blocks: int) -> None:
        array = np.zeros((rows, blocks), np.int32)
        old_rows, old_blocks = self.array.shape
        array[:old_rows, :old_blocks] = self.array
        self.array = array
        self.lengths = np.concatenate([self.lengths, np.zeros(rows - old_rows, np.int64)])


def padded_tables(chunks: list[SequenceChunk], fill: int) -> np.ndarray:
    """The chunks' block tables as one [len(chunks), widest (at least 1)] int32 array, each
    row padded with `fill`: one gather of the rank's `BlockTables` rows that `apply` named.
    Chunks built by hand with plain lists (benchmarks, the worker factory's memory probe)
    take the slower copy of those lists."""
    owner = chunks[0].table_row[0] if chunks and chunks[0].table_row is not None else None
    if owner is None or not all(c.table_row is not None and c.table_row[0] is owner for c in chunks):
        return padded_block_tables([c.block_table for c in chunks], fill)
    rows = np.fromiter((c.table_row[1] for c in chunks), np.int64, len(chunks))
    return owner.gather(rows, fill)
