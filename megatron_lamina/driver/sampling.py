"""The batched sampler (driver only), for the parameters of requests/sampling_params.py.

A request with a `seed` draws with its own `torch.Generator` seeded with it, so its tokens
do not depend on which other requests share its batch or micro-batch; a request without one
has no generator of its own.

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

import itertools

import numpy as np
import torch

from megatron_lamina.requests.sampling_params import SamplingParams
from megatron_lamina.host_to_device import HostArrays, to_device


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
