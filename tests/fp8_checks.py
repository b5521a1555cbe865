"""How a run with FP8 (KV cache, weights) is held to an unquantized reference's tokens and logits.

FP8 moves the logits a little, so exact tokens are too much to ask: the logits of every step
must lie within `atol` of the reference's up to a request's first different token (after it
the contexts differ), and a greedy request may take another token only where the
reference's logits were a near tie there (its token within 2 x atol of the best). A seeded
sample may move anywhere (a top-p edge moves with the logits).
"""

from __future__ import annotations

import torch
from conftest import REQUESTS


def check_fp8_run(label: str, result: dict, tokens: list[list[int]], logits: list[torch.Tensor], atol: float) -> None:
    greedy = [params.temperature == 0.0 for _, params in REQUESTS]
    assert result["reasons"] == ["length"] * len(REQUESTS), label
    for i, (got_tokens, want_tokens) in enumerate(zip(result["tokens"], tokens)):
        same = next((n for n, (a, b) in enumerate(zip(got_tokens, want_tokens)) if a != b), len(want_tokens))
        got, want = result["logits"][i][:same + 1].cpu(), logits[i][:same + 1]
        assert torch.allclose(got, want, atol=atol, rtol=0), (label, i, (got - want).abs().max())
        if greedy[i] and same < len(want_tokens):
            gap = (want[same].max() - want[same][got_tokens[same]]).item()
            assert gap <= 2 * atol, (label, i, got_tokens, want_tokens, gap)
