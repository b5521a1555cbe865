"""Sampling parameters and the batched sampler (driver only).

`SamplingParams` follows vLLM/OpenAI: temperature 0 is greedy; otherwise logits are divided
by the temperature, cut to the `top_k` largest and to the smallest set whose probability
reaches `top_p`, and one token is drawn. A request with a `seed` draws with its own
`torch.Generator` seeded with it, so its tokens do not depend on which other requests share
its batch or micro-batch; a request without one has no generator of its own.

`sample_tokens` samples a whole step's rows where the logits are (the GPU on a GPU): one
argmax over the greedy rows, the temperature / top-k / top-p arithmetic once per group of
rows with identical (temperature, top_k, top_p), and a single transfer of the B token ids
to the host at the end. The draw is `torch.multinomial`'s own one-sample method (argmax of
probs / q with q ~ Exp(1)), written out so that it needs no host synchronisation. As in
vLLM V1, the noise q of every row without a generator comes from ONE `exponential_` call
per step on the device's default generator (`torch.manual_seed` makes it repeatable): one
launch, not one per row. Only a row with a generator (a seeded request) draws its own row
of q from it; on the CPU that gives exactly the numbers `torch.multinomial(probs, 1,
generator=...)` gives (tests check this).

Generators live on the logits' device (`SamplingParams.make_generator(device)`; the engine
uses its driver rank's device). On a GPU, seeded sampling is reproducible from run to run
(same seed, same GPU type and PyTorch version, same tokens) but draws different numbers than
on the CPU, because the CUDA generator is a different random stream (Philox) than the CPU
one (Mersenne Twister) -- as in vLLM. What the sampler builds from Python values (the
row order, a logit bias, the tokens a penalty counts) reaches the device in one pinned,
asynchronous copy (host_to_device.py), so the host never waits for the step in flight.
"""

from __future__ import annotations

import dataclasses
import itertools
import reprlib
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_lamina.requests.sampling_rules import MAX_LOGPROBS, RULES, SEED_RANGE, is_integer
from megatron_lamina.requests.structured_output import StructuredOutput
from megatron_lamina.host_to_device import HostArrays, to_device


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
        return torch.Generator(device=device).manual_seed(self.seed)


# The largest logit a penalty or bias may leave (a small repetition_penalty multiplies one):
# divided by the smallest temperature that is not greedy it is still a finite float32, so the
# row's softmax never meets inf - inf.
SAFE_LOGIT = torch.finfo(torch.float32).max * SamplingParams.GREEDY_BELOW / 2


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                  history: list[tuple[list[int], list[int]] | None] | None = None) -> list[int]:
    """logits: [B, vocab] (any float dtype, any device); row i is sampled with params[i] and
    generators[i] (on the logits' device; None: the step's batched noise), `history[i]` its
    (prompt, output) tokens where its params need them (the penalties). Returns the B token
    ids; the only transfer to the host is the final one of those B integers."""
    return sample_tokens_on_device(logits, params, generators, history).tolist()


def sample_tokens_on_device(logits: torch.Tensor, params: list[SamplingParams],
                            generators: list[torch.Generator | None],
                            history: list[tuple[list[int], list[int]] | None] | None = None) -> torch.Tensor:
    """`sample_tokens` without the transfer: the B token ids as an int64 tensor on the
    logits' device, computed without any host synchronisation (the engine reads them back
    later, and feeds them to the next step on the device)."""
    rows = logits.shape[0]
    if len(params) != rows or len(generators) != rows:
        raise ValueError(f"{rows} rows of logits, {len(params)} sampling params, {len(generators)} generators")
    if rows == 0:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    logits = logits.float()
    groups: dict[tuple, list[int]] = {}  # parameters -> rows; every greedy row in one group
    for i, p in enumerate(params):
        if p.per_row:
            key = ("row", i)
        elif p.temperature == 0:
            key = (0.0, -1, 1.0, 0.0)
        else:
            key = (p.temperature, p.top_k, p.top_p, p.min_p)
        groups.setdefault(key, []).append(i)
    order = [i for rows_of_group in groups.values() for i in rows_of_group]
    permuted = order != list(range(rows))
    # What the sampler needs from the host (the row order, each adjusted row's bias and
    # penalty tokens) travels in one pinned, asynchronous copy: the host never waits.
    arrays = {"order": np.asarray(order, np.int64)} if permuted else {}
    for key, members in groups.items():
        if key[0] == "row":
            arrays.update(_row_arrays(members[0], params[members[0]], history[members[0]] if history else None,
                                      logits.shape[-1]))
    [staged] = to_device([HostArrays(arrays)], logits.device) if arrays else [{}]
    if permuted:  # make each group a contiguous block of rows: one gather, one scatter back
        logits = logits.index_select(0, staged["order"])
    drawn = [(row, generators[i]) for row, i in enumerate(order) if params[i].temperature != 0]
    noise = _noise(logits, [(row, g) for row, g in drawn if g is not None], any(g is None for _, g in drawn))
    chosen, start = [], 0
    for key, members in groups.items():
        block = logits[start:start + len(members)]
        q = noise[start:start + len(members)] if noise is not None else None
        start += len(members)
        if key[0] == "row":
            p = params[members[0]]
            block = _adjusted(block, p, members[0], staged)
            key = (p.temperature, p.top_k, p.top_p, p.min_p)
        temperature, top_k, top_p, min_p = key
        if temperature == 0:
            chosen.append(torch.argmax(block, dim=-1))
        else:
            chosen.append(torch.argmax(_probabilities(block, temperature, top_k, top_p, min_p) / q, dim=-1))
    tokens = chosen[0] if len(chosen) == 1 else torch.cat(chosen)
    if permuted:
        tokens = torch.empty_like(tokens).index_copy_(0, staged["order"], tokens)
    return tokens


def _row_arrays(i: int, params: SamplingParams, history: tuple[list[int], list[int]] | None,
                vocab: int) -> dict[str, np.ndarray]:
    """Row i's logit bias (token ids, and the biases as float64 bits: the copy is int64) and
    penalty tokens (repetition: every prompt and output token; presence and frequency: the
    output's), for `adjust_logits`."""
    arrays = {}
    if params.logit_bias:
        ids = [t for t in params.logit_bias if t < vocab]
        arrays[f"bias_ids{i}"] = np.asarray(ids, np.int64)
        arrays[f"bias{i}"] = np.asarray([params.logit_bias[t] for t in ids], np.float64).view(np.int64)
    if params.needs_history:
        prompt, output = history or ([], [])
        if params.repetition_penalty != 1:
            arrays[f"seen{i}"] = np.fromiter((t for t in itertools.chain(prompt, output) if t < vocab), np.int64)
        if output and (params.presence_penalty or params.frequency_penalty):
            arrays[f"output{i}"] = np.fromiter((t for t in output if t < vocab), np.int64)
    return arrays


def adjust_logits(logits: torch.Tensor, params: SamplingParams,
                  history: tuple[list[int], list[int]] | None) -> torch.Tensor:
    """One row [1, vocab] float32 with its logit bias and penalties applied, as OpenAI (bias,
    presence, frequency: over the output) and HF/vLLM (repetition: over prompt and output)
    define them, and clamped to +-SAFE_LOGIT: a row on its own (the sampler stages every
    adjusted row's arrays in the step's one copy)."""
    [staged] = to_device([HostArrays(_row_arrays(0, params, history, logits.shape[-1]))], logits.device)
    return _adjusted(logits, params, 0, staged)


def _adjusted(logits: torch.Tensor, params: SamplingParams, i: int, staged: dict[str, torch.Tensor]) -> torch.Tensor:
    """`adjust_logits` of row i, its `_row_arrays` already on the device (`staged`)."""
    logits = logits.clone()
    vocab, device = logits.shape[-1], logits.device
    if f"bias_ids{i}" in staged:
        logits[0].index_add_(0, staged[f"bias_ids{i}"], staged[f"bias{i}"].view(torch.float64).float())
    if f"seen{i}" in staged:
        seen = torch.zeros(vocab, dtype=torch.bool, device=device).index_fill_(0, staged[f"seen{i}"], True)
        row = logits[0]
        penalized = torch.where(row > 0, row / params.repetition_penalty, row * params.repetition_penalty)
        logits[0] = torch.where(seen, penalized, row)
    if f"output{i}" in staged:
        output = staged[f"output{i}"]
        counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        counts.index_add_(0, output, torch.ones(output.shape, device=device))
        logits[0] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return logits.clamp_(-SAFE_LOGIT, SAFE_LOGIT)


def _probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                   min_p: float = 0.0) -> torch.Tensor:
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
    probs = torch.softmax(logits, dim=-1)
    if min_p > 0:  # keep tokens at least min_p x as likely as the most likely one (it always stays)
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _noise(logits: torch.Tensor, own: list[tuple[int, torch.Generator]], shared: bool) -> torch.Tensor | None:
    """q ~ Exp(1), [B, vocab] float32 (like the probabilities it divides), for the drawn rows
    of logits: with `shared`, every row's from ONE `exponential_` over the batch on the
    device's default generator; then each (row, generator) of `own` redrawn from its own
    generator alone, exactly as `torch.multinomial` would draw it, so a seeded row's numbers
    do not depend on its batch. None when no row is drawn (all greedy)."""
    if not own and not shared:
        return None
    q = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    if shared:
        q.exponential_()
    for row, generator in own:
        q[row].exponential_(1.0, generator=generator)
    return q
