"""Sampling parameters as data: one request's settings, checked by the one validator of
sampling fields (requests/sampling_rules.py), which the server's and the batch job's schema
apply too; the driver's sampler (driver/sampling.py) draws with them.

`SamplingParams` follows vLLM/OpenAI: temperature 0 is greedy; otherwise logits are divided
by the temperature, cut to the `top_k` largest and to the smallest set whose probability
reaches `top_p`, and one token is drawn. A request with a `seed` draws with its own
`torch.Generator` seeded with it (`make_generator`, on the driver), so its tokens do not
depend on which other requests share its batch; a request without one has no generator of
its own. Torch-free: the HTTP front end imports it.
"""

from __future__ import annotations

import dataclasses
import reprlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megatron_lamina.requests.sampling_rules import MAX_LOGPROBS, RULES, SEED_RANGE, is_integer
from megatron_lamina.requests.structured_output import StructuredOutput

if TYPE_CHECKING:
    import torch


@dataclass
class SamplingParams:
    """One request's sampling settings, checked here by the one validator of sampling fields
    (`requests/sampling_rules.py`), which the server's and the batch job's schema apply too.

    Values at the edge are taken as the limit they tend to, never as an overflow: a
    temperature below `GREEDY_BELOW` (vLLM's epsilon) is greedy, since dividing logits by it
    overflows float32 into inf - inf = NaN; a top_p below `MIN_TOP_P` counts as `MIN_TOP_P`
    (one that rounds to a float32 zero would drop every token), which keeps the most likely
    token only; a repetition_penalty below `MIN_REPETITION_PENALTY` counts as it (dividing a
    logit by 1e-37 overflowed to inf, and the row's softmax to NaN: token 0 every time), which
    already puts the seen token with the largest logit far above every other.
    """

    GREEDY_BELOW = 1e-5
    MIN_TOP_P = 1e-8
    MIN_REPETITION_PENALTY = 1e-6
    SEED_RANGE = SEED_RANGE
    MAX_LOGPROBS = MAX_LOGPROBS

    max_tokens: int = 16        # 0 only to score a prompt (with prompt_logprobs): nothing is generated
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1             # -1 or 0: no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0         # EOS, stop strings and stop tokens do not end the request before this many
    stop_token_ids: list[int] = field(default_factory=list)  # end the request like EOS ("stop")
    min_p: float = 0.0          # drop tokens below min_p x the most likely one's probability
    presence_penalty: float = 0.0    # OpenAI: - p for every token the output already holds
    frequency_penalty: float = 0.0   # OpenAI: - f x the number of times the output holds it
    repetition_penalty: float = 1.0  # HF/vLLM: logits of prompt and output tokens / r (x r if negative)
    logit_bias: dict[int, float] | None = None  # added to the logits (OpenAI), token id -> bias
    logprobs: int | None = None          # per generated token: its log-probability and this many alternatives
    prompt_logprobs: int | None = None   # the same for the prompt's tokens (echo), the first one has none
    structured_outputs: StructuredOutput | None = None  # what the output must match (a grammar on the device)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        scoring = self.prompt_logprobs is not None  # max_tokens 0 scores the prompt only
        if not (is_integer(self.max_tokens) and self.max_tokens >= (0 if scoring else 1)):
            raise ValueError(f"max_tokens = {self.max_tokens!r}: must be an integer >= 1 (0 only with prompt "
                             "log-probabilities: echo)")
        for name, rule in RULES.items():
            value = getattr(self, name)
            problem = rule(value)
            if problem is not None:  # reprlib: a hostile value (10 MB of stop strings) is not echoed whole
                raise ValueError(f"{name} = {reprlib.repr(value)}: {problem}")
        if self.temperature < self.GREEDY_BELOW:
            self.temperature = 0.0
        self.top_p = max(float(self.top_p), self.MIN_TOP_P)
        self.repetition_penalty = max(float(self.repetition_penalty), self.MIN_REPETITION_PENALTY)

    @property
    def needs_history(self) -> bool:
        """Its next token depends on the tokens before it (the penalties)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def per_row(self) -> bool:
        """Sampled on its own row (penalties or a logit bias), not in a group of identical rows."""
        return self.needs_history or bool(self.logit_bias)

    def samples(self, n: int) -> list["SamplingParams"]:
        """The parameters of `n` independent samples of one prompt (OpenAI's `n`): sample i
        seeded `seed + i` (unseeded: each its own draw), so they differ and a seeded request repeats."""
        if self.seed is None:
            return [self] * n
        return [self] + [dataclasses.replace(self, seed=self.seed + i) for i in range(1, n)]

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """This request's generator on `device` (where its logits will be), seeded with
        `seed`; None without a seed: the row shares the step's one batched draw."""
        if self.seed is None:
            return None
        import torch  # the driver's: this module stays importable without torch

        return torch.Generator(device=device).manual_seed(self.seed)
