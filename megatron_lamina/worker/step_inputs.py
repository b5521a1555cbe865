"""A micro-batch's model inputs on the device: token ids, positions, the rows to sample.

Built on the host from the step plan as numpy arrays (`host_inputs`) and copied to the device
with the rest of the step (host_to_device.py). A decode token that was sampled in the
previous step and not yet read back (the chunk's `feed`, asynchronous scheduling) is taken
from that step's sampled tokens, which are still on the device: the copy carries a
placeholder and `finish` overwrites those rows with one indexed copy, in stream order after
the previous step's sampler, so the host never waits for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_lamina.host_to_device import HostArrays
from megatron_lamina.plan import MicroBatch


@dataclass
class MicroBatchInputs:
    num_rows: int
    token_ids: torch.Tensor                  # [rows] int64
    positions: torch.Tensor                  # [rows] int64
    sample_rows: torch.Tensor | None         # rows whose logits are computed (None: every row)


def host_inputs(mb: MicroBatch, fed: torch.Tensor | None) -> HostArrays:
    """`fed`: the previous step's sampled tokens on the device (needed if a chunk has a feed)."""
    tokens = np.fromiter((t for c in mb.chunks for t in c.tokens), np.int64)
    if len(tokens) == len(mb.chunks):  # decode rows only: one position each
        positions = np.fromiter((c.start for c in mb.chunks), np.int64, len(mb.chunks))
    else:
        positions = np.concatenate([np.arange(c.start, c.end) for c in mb.chunks])
    ends = np.cumsum([len(c.tokens) for c in mb.chunks]) - 1
    # The rows whose logits the head computes: every token's of a chunk that wants them all
    # (prompt log-probabilities), else the last token's of a sampled chunk (StepPlan.logit_layout).
    rows = [np.arange(end - len(c.tokens) + 1, end + 1) if c.all_logits else [end]
            for c, end in zip(mb.chunks, ends) if c.all_logits or c.sample]
    logit_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    every_row = len(logit_rows) == len(tokens)
    arrays = {"token_ids": tokens, "positions": positions}
    if not every_row:
        arrays["sample_rows"] = logit_rows
    feeds = [(row, c.feed) for row, c in zip(ends, mb.chunks) if c.feed >= 0]
    if feeds:
        assert fed is not None, "a chunk is fed from a previous step that this rank did not see"
        arrays["feed"] = np.asarray(feeds, np.int64).T  # [2, feeds]: destination rows, source rows

    def finish(t: dict[str, torch.Tensor]) -> MicroBatchInputs:
        token_ids = t["token_ids"]
        if feeds:
            token_ids.index_copy_(0, t["feed"][0], fed.index_select(0, t["feed"][1]))
        return MicroBatchInputs(len(tokens), token_ids, t["positions"], None if every_row else t["sample_rows"])

    return HostArrays(arrays, finish)
