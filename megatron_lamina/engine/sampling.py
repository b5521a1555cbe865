"""Sampling parameters and the sampler (driver only).

`SamplingParams` follows vLLM/OpenAI: temperature 0 is greedy; otherwise logits are divided
by the temperature, cut to the `top_k` largest and to the smallest set whose probability
reaches `top_p`, and one token is drawn with the request's own `torch.Generator`. A request
with a `seed` gets a generator seeded with it, so its tokens do not depend on which other
requests share its batch or micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1             # -1 or 0: no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0         # EOS and stop strings do not end the request before this many

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an integer >= 1"),
            (self.temperature >= 0, "temperature", "a number >= 0"),
            (0 < self.top_p <= 1, "top_p", "a number in (0, 1]"),
            (isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 0), "top_k", "-1, 0 or a positive integer"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "a string or a list of non-empty strings"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)!r}: must be {allowed}")

    def make_generator(self) -> torch.Generator:
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits: [vocab] (any float dtype) -> one token id."""
    logits = logits.float().cpu()
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
