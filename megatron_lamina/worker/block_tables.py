"""Every cache-holding rank's own copy of the block tables, kept from the plans' deltas.

The driver's block manager owns the tables; a plan carries only what changed (each chunk's
`new_blocks`, and the requests whose blocks were `released`), so nothing proportional to the
context length crosses the control plane every step (plan.py). Every rank that holds a cache
(an attention worker, every colocated model worker, the driver's included) applies each plan
to its `BlockTables` before running it.

As vLLM V1's `BlockTable`: the tables live in one persistent `[rows, max blocks]` int32 numpy
array, sized for the batch and the model's context at start-up, one row per request, that
`apply` writes the deltas into. Unlike vLLM's, the array has a mirror on the device, and a
step copies only the entries written since the last step (`apply` returns them for the
step's one host-to-device copy, host_to_device.py); the attention index then gathers its
rows from the mirror on the device (`ChunkTables`). So a decode step's host work is
proportional to the batch, not to batch x context: the host never copies a whole table.
Entries past a row's length are left as they were (the blocks of an earlier holder of the
row): every kernel reads a table only up to the row's context length.

`apply` also names each served chunk's row (`chunk.table_row`) and sets `chunk.block_table`
to a host view of it (the reference attention and prefill slots read it).
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import numpy as np
import torch

from megatron_lamina.attention.kv_cache import padded_block_tables
from megatron_lamina.host_to_device import HostArrays
from megatron_lamina.plan import SequenceChunk, StepPlan

_REQUEST_ID = operator.attrgetter("request_id")
_NEW_BLOCKS = operator.attrgetter("new_blocks")
_TABLE_ROW = operator.attrgetter("table_row")


class BlockTables:
    def __init__(self, shard: int | None = None, rows: int = 64, max_blocks: int = 64,
                 device: torch.device | str = "cpu"):
        """`shard`: keep only that request shard's tables (an attention worker); None: all.
        `rows`, `max_blocks`: the batch and the blocks of the longest context (the array
        doubles if a step ever needs more, and the mirror is then rewritten whole).
        `device`: where the mirror lives (the rank's cache device)."""
        assert rows >= 1 and max_blocks >= 1
        self.shard, self.device = shard, torch.device(device)
        self.array = np.zeros((rows, max_blocks), np.int32)
        self.lengths = np.zeros(rows, np.int64)      # blocks in use in each row
        self.row_of: dict[int, int] = {}             # request id -> its row
        self._free = list(range(rows - 1, -1, -1))  # rows no request holds, the lowest last (popped first)
        self.mirror: torch.Tensor | None = None      # [rows, max blocks] int64 on `device`, after the first step
        self._written: list[tuple[int, int, int]] = []  # (row, first, end) entries the mirror lacks
        # Each row's table as a host view (`chunk.block_table`), made when first asked for
        # since the row last changed: a decode step's chunks reuse them (a view costs more than
        # the rest of a chunk's apply).
        self._views: list[np.ndarray | None] = [None] * rows

    def apply(self, plan: StepPlan) -> HostArrays:
        """Write the plan's deltas into the array; returns the entries the device mirror
        lacks, to travel in the step's one host-to-device copy ahead of the step's indices
        (their `finish` writes the mirror, in stream order before any gather of it)."""
        for request_id in plan.released:
            row = self.row_of.pop(request_id, None)
            if row is not None:
                self.lengths[row], self._views[row] = 0, None
                self._free.append(row)
        served = [c for mb in plan.micro_batches
                  for c in (mb.chunks if self.shard is None else mb.shard_chunks(self.shard))]
        # A decode step serves hundreds of chunks and announces a block for few of them: the
        # rows are looked up in one map, and only the chunks with new blocks visit the array.
        rows = list(map(self.row_of.get, map(_REQUEST_ID, served)))
        if None in rows:  # requests new to this rank
            for i, chunk in enumerate(served):
                if rows[i] is None:
                    rows[i] = self.row_of[chunk.request_id] = self._take_row()
        for i in itertools.compress(range(len(rows)), map(_NEW_BLOCKS, served)):
            row, new_blocks = rows[i], served[i].new_blocks
            start = int(self.lengths[row])
            end = start + len(new_blocks)
            if end > self.array.shape[1]:
                self._grow(self.array.shape[0], max(end, 2 * self.array.shape[1]))
            self.array[row, start:end] = new_blocks
            self.lengths[row], self._views[row] = end, None
            self._written.append((row, start, end))
        # Views only once every row is written: a growth above moved the array.
        views = self._views
        for chunk, row in zip(served, rows):
            view = views[row]
            if view is None:
                view = views[row] = self.array[row, :self.lengths[row]]
            chunk.table_row, chunk.block_table = (self, row), view
        return self._mirror_writes()

    def _mirror_writes(self) -> HostArrays:
        if self.mirror is None or self.mirror.shape != self.array.shape:  # the first step, or grown
            self._written = []
            return HostArrays({"whole": self.array}, self._set_mirror)
        written, self._written = self._written, []
        if not written:
            return HostArrays({})
        rows, starts, ends = (np.fromiter(column, np.int64, len(written)) for column in zip(*written))
        counts = ends - starts
        cols = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(starts, counts)
        rows = np.repeat(rows, counts)
        return HostArrays({"at": rows * self.array.shape[1] + cols, "blocks": self.array[rows, cols]},
                          self._write_mirror)

    def _set_mirror(self, views: dict[str, torch.Tensor]) -> None:
        self.mirror = views["whole"].clone()

    def _write_mirror(self, views: dict[str, torch.Tensor]) -> None:
        self.mirror.view(-1).index_copy_(0, views["at"], views["blocks"])

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
        self._views = [None] * rows  # views of the old array


@dataclass
class ChunkTables:
    """The block tables of some chunks, as an attention index reads them: rows of the rank's
    `BlockTables`, gathered from its device mirror on the device (`rows`), or, for chunks
    built by hand with plain lists (kernel tests, benchmarks, the worker factory's memory
    probe), one padded host array (`padded`) that travels whole. `width`: the widest table."""

    width: int
    owner: BlockTables | None = None
    rows: np.ndarray | None = None
    padded: np.ndarray | None = None

    @classmethod
    def of(cls, chunks: list[SequenceChunk], fill: int = 0) -> ChunkTables:
        table_rows = list(map(_TABLE_ROW, chunks))
        if chunks and None not in table_rows:
            owners, rows = zip(*table_rows)
            owner = owners[0]
            if owners.count(owner) == len(owners):  # all rows of one BlockTables (compared by identity)
                rows = np.array(rows, np.int64)
                return cls(max(int(owner.lengths[rows].max(initial=0)), 1), owner, rows)
        padded = padded_block_tables([c.block_table for c in chunks], fill)
        return cls(padded.shape[1], padded=padded)

    def blocks_at(self, index: np.ndarray) -> np.ndarray:
        """Each chunk's block number `index[i]` (within its table), on the host."""
        if self.owner is None:
            return self.padded[np.arange(len(index)), index]
        return self.owner.array[self.rows, index]

    def host_arrays(self, name: str) -> dict[str, np.ndarray]:
        """What travels in the step's copy: the rows to gather, or the padded tables."""
        return {name: self.padded} if self.owner is None else {name: self.rows}

    def on_device(self, views: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """[chunks, width] int64 on the device (from `host_arrays(name)`'s copy)."""
        if self.owner is None:
            return views[name]
        return self.owner.mirror[:, :self.width].index_select(0, views[name])
