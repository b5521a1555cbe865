"""Grammar masks on the logits' device: the rows that need one get -inf where a token is not allowed.

The engine (`LLMEngine._launch`) fills a host bitmask (`engine/grammar.py`: one bit per
token id, in int32 words, one row per constrained request) while the device runs the step's
model, sends it from pinned memory without blocking, and calls `masked_logits` before the
sampler and the log-probabilities, so both see the constrained distribution: a constrained
row's logprobs are those of the tokens the grammar allows. The bits are unpacked on the
device (one shift-and-mask over [rows, words, 32]); unconstrained rows are not touched.
"""

from __future__ import annotations

import torch


def masked_logits(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of `logits` [B, vocab] whose `rows` get -inf at every token their bitmask row
    ([len(rows), words] int32, host) clears. Nothing waits for the device."""
    device = logits.device
    bits = _to_device(bitmask[:len(rows)], device)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :logits.shape[-1]]
    if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
        return logits.masked_fill(~allowed, float("-inf"))
    index = _to_device(torch.tensor(rows, dtype=torch.long), device)
    constrained = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, index, constrained)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On a GPU from pinned memory, without blocking (a pageable copy would wait for the device)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
