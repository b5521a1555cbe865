"""The step plan: what every rank does in one engine step (DESIGN.md section 5).

The driver (rank 0) builds one `StepPlan` per step and broadcasts it; model workers,
attention workers and the colocated attention path all read the same plan, so they post
the same sends and receives in the same order and data-plane messages need no metadata.
A plan is a list of `MicroBatch`es; a micro-batch is a list of `SequenceChunk`s (one per
request: a prefill chunk or a single decode token), ordered by request shard so that the
rows each attention shard owns are one contiguous slice. This is a leaf module shared by
the engine, the model workers, the transport and the attention workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class SequenceChunk:
    """One request's tokens in one step: positions start .. start+len(tokens)-1."""

    request_id: int
    shard: int
    start: int
    tokens: list[int]
    block_table: list[int]
    sample: bool  # the logits of the last token are needed (decode, or last prefill chunk)

    @property
    def end(self) -> int:
        """Context length after this chunk is appended."""
        return self.start + len(self.tokens)


@dataclass
class MicroBatch:
    chunks: list[SequenceChunk]

    def __post_init__(self):
        shards = [c.shard for c in self.chunks]
        assert shards == sorted(shards), "chunks of a micro-batch must be ordered by shard"

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)

    @cached_property
    def token_ids(self) -> torch.Tensor:
        return torch.tensor([t for c in self.chunks for t in c.tokens], dtype=torch.long)

    @cached_property
    def positions(self) -> torch.Tensor:
        return torch.tensor(
            [p for c in self.chunks for p in range(c.start, c.end)], dtype=torch.long
        )

    @cached_property
    def sample_rows(self) -> torch.Tensor:
        """Row index of the last token of every chunk whose logits are sampled."""
        rows, offset = [], 0
        for c in self.chunks:
            offset += len(c.tokens)
            if c.sample:
                rows.append(offset - 1)
        return torch.tensor(rows, dtype=torch.long)

    @cached_property
    def _shard_ranges(self) -> dict[int, tuple[int, int]]:
        ranges, row = {}, 0
        for c in self.chunks:
            lo, _ = ranges.get(c.shard, (row, row))
            row += len(c.tokens)
            ranges[c.shard] = (lo, row)
        return ranges

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """The [lo, hi) token rows that belong to request shard `shard` (computed once: the
        transport asks for every layer)."""
        if shard in self._shard_ranges:
            return self._shard_ranges[shard]
        row = sum(len(c.tokens) for c in self.chunks if c.shard < shard)
        return row, row

    def shard_chunks(self, shard: int) -> list[SequenceChunk]:
        return [c for c in self.chunks if c.shard == shard]


@dataclass
class StepPlan:
    micro_batches: list[MicroBatch] = field(default_factory=list)
    shutdown: bool = False  # every rank leaves its loop after this plan

    @property
    def sampled_chunks(self) -> list[SequenceChunk]:
        """The chunks whose next token the driver samples, in logits-row order."""
        return [c for mb in self.micro_batches for c in mb.chunks if c.sample]
