"""Sampling parameters and the batched sampler (driver only).

`SamplingParams` follows vLLM/OpenAI: temperature 0 is greedy; otherwise logits are divided
by the temperature, cut to the `top_k` largest and to the smallest set whose probability
reaches `top_p`, and one token is drawn with the request's own `torch.Generator`. A request
with a `seed` gets a generator seeded with it, so its tokens do not depend on which other
requests share its batch or micro-batch.

`sample_tokens` samples a whole step's rows where the logits are (the GPU on a GPU): one
argmax over the greedy rows, the temperature / top-k / top-p arithmetic once per group of
rows with identical (temperature, top_k, top_p), one draw per row from that row's own
generator, and a single transfer of the B token ids to the host at the end. The draw is
`torch.multinomial`'s own one-sample method (argmax of probs / q with q ~ Exp(1) drawn by the
row's generator), written out so that it needs no host synchronisation; on the CPU it gives
exactly the numbers `torch.multinomial(probs, 1, generator=...)` gives (tests check this).

Generators live on the logits' device (`SamplingParams.make_generator(device)`; the engine
uses its driver rank's device). On a GPU, seeded sampling is reproducible from run to run
(same seed, same GPU type and PyTorch version, same tokens) but draws different numbers than
on the CPU, because the CUDA generator is a different random stream (Philox) than the CPU
one (Mersenne Twister) -- as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """One request's sampling settings, checked here (every caller gets the same rules).

    Values at the edge are taken as the limit they tend to, never as an overflow: a
    temperature below `GREEDY_BELOW` (vLLM's epsilon) is greedy, since dividing logits by it
    overflows float32 into inf - inf = NaN; a top_p below `MIN_TOP_P` counts as `MIN_TOP_P`
    (one that rounds to a float32 zero would drop every token), which keeps the most likely
    token only. A seed must fit `torch.Generator.manual_seed` (`SEED_RANGE`).
    """

    GREEDY_BELOW = 1e-5
    MIN_TOP_P = 1e-8
    SEED_RANGE = (-2**63, 2**64 - 1)

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

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        low, high = self.SEED_RANGE
        checks = [
            (integer(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1"),
            (number(self.temperature) and 0 <= self.temperature < float("inf"), "temperature",
             "a finite number >= 0"),
            (number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]"),
            (integer(self.top_k) and self.top_k >= -1, "top_k", "-1, 0 or a positive integer"),
            (self.seed is None or integer(self.seed) and low <= self.seed <= high, "seed",
             "null or an integer in [-2**63, 2**64 - 1]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "a string or a list of non-empty strings"),
            (integer(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)!r}: must be {allowed}")
        if self.temperature < self.GREEDY_BELOW:
            self.temperature = 0.0
        self.top_p = max(float(self.top_p), self.MIN_TOP_P)

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """This request's generator on `device` (where its logits will be): seeded with `seed`,
        or from a non-deterministic source without one."""
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator]) -> list[int]:
    """logits: [B, vocab] (any float dtype, any device); row i is sampled with params[i] and
    generators[i] (on the logits' device). Returns the B token ids; the only transfer to the
    host is the final one of those B integers."""
    return sample_tokens_on_device(logits, params, generators).tolist()


def sample_tokens_on_device(logits: torch.Tensor, params: list[SamplingParams],
                            generators: list[torch.Generator]) -> torch.Tensor:
    """`sample_tokens` without the transfer: the B token ids as an int64 tensor on the
    logits' device, computed without any host synchronisation (the engine reads them back
    later, and feeds them to the next step on the device)."""
    rows = logits.shape[0]
    if len(params) != rows or len(generators) != rows:
        raise ValueError(f"{rows} rows of logits, {len(params)} sampling params, {len(generators)} generators")
    if rows == 0:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    logits = logits.float()
    groups: dict[tuple, list[int]] = {}  # (temperature, top_k, top_p) -> rows; every greedy row in one
    for i, p in enumerate(params):
        groups.setdefault((0.0, -1, 1.0) if p.temperature == 0 else (p.temperature, p.top_k, p.top_p), []).append(i)
    order = [i for rows_of_group in groups.values() for i in rows_of_group]
    permuted = order != list(range(rows))
    if permuted:  # make each group a contiguous block of rows: one gather, one scatter back
        index = _index_tensor(order, logits.device)
        logits = logits.index_select(0, index)
    chosen, start = [], 0
    for (temperature, top_k, top_p), members in groups.items():
        block = logits[start:start + len(members)]
        start += len(members)
        if temperature == 0:
            chosen.append(torch.argmax(block, dim=-1))
        else:
            probs = _probabilities(block, temperature, top_k, top_p)
            chosen.append(_draw(probs, [generators[i] for i in members]))
    tokens = chosen[0] if len(chosen) == 1 else torch.cat(chosen)
    if permuted:
        tokens = torch.empty_like(tokens).index_copy_(0, index, tokens)
    return tokens


def _probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """[G, vocab] float32 logits of rows sharing these parameters -> their sampling probabilities."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.softmax(logits, dim=-1)


def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of probs [G, vocab], row i with generators[i]: what
    `torch.multinomial(probs[i], 1, generator=generators[i])` computes (argmax of p / q,
    q ~ Exp(1)), without its host-side validity check, so no synchronisation."""
    q = torch.empty_like(probs)
    for row, generator in zip(q, generators):
        row.exponential_(1.0, generator=generator)
    return torch.argmax(probs / q, dim=-1)


def _index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    index = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":  # from pinned memory: an asynchronous copy, no wait for the GPU
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)
