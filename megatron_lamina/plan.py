"""The step plan: what every rank does in one engine step (DESIGN.md section 5).

The driver (rank 0) builds one `StepPlan` per step and broadcasts it; model workers,
attention workers and the colocated attention path all read the same plan, so they post
the same sends and receives in the same order and data-plane messages need no metadata.
A plan is a list of `MicroBatch`es; a micro-batch is a list of `SequenceChunk`s (one per
request: a prefill chunk or a single decode token), ordered by request shard so that the
rows each attention shard owns are one contiguous slice; a rank that receives the plan makes
a micro-batch's chunk objects from the plan's columns only when asked, a shard's at a time.
This is a leaf module shared by the engine, the model workers, the transport and the
attention workers.

Two things keep the plan small and let the driver plan ahead of the GPU:
  * Block tables never travel whole. A chunk carries `new_blocks`, the blocks appended to
    its request's table since the last plan that carried the request, and the plan lists
    the requests whose blocks were `released`; every rank that holds a cache keeps its own
    copy of the tables (worker/block_tables.py) and fills in `chunk.block_table` from it.
    `block_table` is therefore never sent (see `__getstate__`, and worker/plan_columns.py).
  * A decode token the driver has sampled but not yet read back from the device (the plan
    of step n+1 is built while step n runs: asynchronous scheduling) is `fed`: the chunk's
    `feed` is its row in the previous step's sampled tokens, which stay on the device, and
    `tokens` holds a placeholder.
"""

from __future__ import annotations

import operator
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Callable


@dataclass(slots=True)  # a step builds a thousand: no per-chunk __dict__
class SequenceChunk:
    """One request's tokens in one step: positions start .. start+len(tokens)-1."""

    request_id: int
    shard: int
    start: int
    tokens: list[int]
    new_blocks: list[int]
    sample: bool        # the logits of the last token are needed (decode, or last prefill chunk)
    feed: int = -1      # >= 0: the one token is row `feed` of the previous step's sampled tokens
    all_logits: bool = False  # the logits of every token are needed (prompt log-probabilities)
    # The request's whole block table on this rank (set by the driver's scheduler, or by a
    # receiving rank's BlockTables); never sent.
    block_table: list[int] = field(default_factory=list, repr=False, compare=False)
    # (this rank's BlockTables, the table's row in its array): set with block_table, so that
    # the tables of many chunks are one gather (worker/block_tables.py); never sent.
    table_row: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def end(self) -> int:
        """Context length after this chunk is appended."""
        return self.start + len(self.tokens)

    @property
    def logit_rows(self) -> int:
        """Rows of logits the model computes for it: all its tokens', its last one's, or none."""
        return len(self.tokens) if self.all_logits else int(self.sample)

    def __getstate__(self):
        state = {name: getattr(self, name) for name in self.__slots__}
        state["block_table"], state["table_row"] = [], None
        return state

    def __setstate__(self, state):
        for name, value in state.items():
            setattr(self, name, value)


_SHARD = operator.attrgetter("shard")
_TOKENS = operator.attrgetter("tokens")


class MicroBatch:
    """Some chunks of a step, ordered by request shard (so a shard's rows are one slice).

    The driver's scheduler builds one from its chunks. A rank that receives the plan builds it
    from the plan's integer columns (worker/plan_columns.py): `shards` and `sizes` (each
    chunk's request shard and token count) and `build(lo, hi)`, which makes the chunk objects
    lo..hi-1; they are made when first asked for, a shard's at a time, so an attention rank
    makes only its own shard's (`shard_chunks`), and the rows of the others cost nothing."""

    def __init__(self, chunks: list[SequenceChunk] | None = None, *, shards: list[int] | None = None,
                 sizes: list[int] | None = None, build: Callable[[int, int], list[SequenceChunk]] | None = None):
        if chunks is not None:
            shards = list(map(_SHARD, chunks))
        assert shards == sorted(shards), "chunks of a micro-batch must be ordered by shard"
        assert (chunks is None) == (sizes is not None and build is not None), "chunks, or shards, sizes and build"
        self._chunks, self._shards, self._sizes, self._build = chunks, shards, sizes, build
        self._made: dict[int, list[SequenceChunk]] = {}  # shard -> its chunks, made from the columns
        self._row_ends: list[int] | None = None

    @property
    def chunks(self) -> list[SequenceChunk]:
        if self._chunks is None:
            self._chunks = [c for shard in dict.fromkeys(self._shards) for c in self.shard_chunks(shard)]
        return self._chunks

    def shard_chunks(self, shard: int) -> list[SequenceChunk]:
        """The chunks of request shard `shard`: one slice, the chunks being ordered by shard."""
        lo, hi = bisect_left(self._shards, shard), bisect_right(self._shards, shard)
        if self._chunks is not None:
            return self._chunks[lo:hi]
        if shard not in self._made:
            self._made[shard] = self._build(lo, hi) if hi > lo else []
        return self._made[shard]

    @property
    def num_rows(self) -> int:
        """Token rows of the micro-batch (every chunk's tokens, in chunk order)."""
        return self._ends()[-1] if self._shards else 0

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """The [lo, hi) token rows that belong to request shard `shard` (the transport asks
        for every layer: the rows' ends are summed once)."""
        ends = self._ends()
        lo, hi = bisect_left(self._shards, shard), bisect_right(self._shards, shard)
        return ends[lo - 1] if lo else 0, ends[hi - 1] if hi else 0

    def _ends(self) -> list[int]:
        if self._row_ends is None:
            sizes = self._sizes if self._sizes is not None else map(len, map(_TOKENS, self._chunks))
            self._row_ends = list(accumulate(sizes))
        return self._row_ends

    @property
    def decode_only(self) -> bool:
        return all(len(c.tokens) == 1 and c.sample for c in self.chunks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MicroBatch) and self.chunks == other.chunks

    def __repr__(self) -> str:
        return f"MicroBatch({self.chunks!r})"

    def __reduce__(self):
        return MicroBatch, (self.chunks,)  # pickled as its chunks, as a dataclass of them was


@dataclass
class StepPlan:
    micro_batches: list[MicroBatch] = field(default_factory=list)
    released: list[int] = field(default_factory=list)  # requests whose blocks were freed
    shutdown: bool = False  # every rank leaves its loop after this plan
    # The prefix cache's host tier (worker/host_tier.py): (shard, device block, host slot)
    # triples, flat, copied before the step runs: device to host, then host to device.
    offloads: list[int] = field(default_factory=list)
    loads: list[int] = field(default_factory=list)

    @property
    def sampled_chunks(self) -> list[SequenceChunk]:
        """The chunks whose next token the driver samples, in logits-row order."""
        return [c for mb in self.micro_batches for c in mb.chunks if c.sample]

    @property
    def num_sampled(self) -> int:
        return sum(c.sample for mb in self.micro_batches for c in mb.chunks)

    def logit_layout(self) -> tuple[list[int], list[tuple[SequenceChunk, int]]]:
        """Where the model's logits rows of this plan come from (one block per chunk, in plan
        order, of `chunk.logit_rows` rows): the row of every sampled chunk (in
        `sampled_chunks` order) and the first row of every chunk that wants all its logits."""
        sampled, whole, row = [], [], 0
        for mb in self.micro_batches:
            for c in mb.chunks:
                if c.all_logits:
                    whole.append((c, row))
                row += c.logit_rows
                if c.sample:
                    sampled.append(row - 1)
        return sampled, whole
