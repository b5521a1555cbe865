"""Grammar masks on the logits' device: the rows that need one get -inf where a token is not allowed.

The engine (`LLMEngine._launch`) fills a host bitmask (`requests/grammar.py`: one bit per
token id, in int32 words, one row per constrained request) while the device runs the step's
model, sends it in one pinned copy without blocking, and calls `masked_logits` before the
sampler and the log-probabilities, so both see the constrained distribution: a constrained
row's logprobs are those of the tokens the grammar allows. The bits are unpacked on the
device (one shift-and-mask over [rows, words, 32]); unconstrained rows are not touched.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_lamina.host_to_device import HostArrays, to_device


def masked_logits(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of `logits` [B, vocab] whose `rows` get -inf at every token their bitmask row
    ([len(rows), words] int32, host) clears. Nothing waits for the device: the bits and the
    rows travel in one pinned copy (host_to_device.py)."""
    arrays = {"bits": bitmask[:len(rows)].numpy()}
    whole = len(rows) == logits.shape[0] and rows == list(range(len(rows)))
    if not whole:
        arrays["rows"] = np.asarray(rows, np.int64)
    [staged] = to_device([HostArrays(arrays)], logits.device)
    # int32 words widened to int64: bits 0-31 are the same, so the shifts read the same bits.
    shifts = torch.arange(32, dtype=torch.int64, device=logits.device)
    allowed = ((staged["bits"].unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :logits.shape[-1]]
    if whole:
        return logits.masked_fill(~allowed, float("-inf"))
    index = staged["rows"]
    constrained = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, index, constrained)
