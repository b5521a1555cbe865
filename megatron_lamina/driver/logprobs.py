"""Log-probabilities a request asked for, computed on the device from the step's logits.

For generated tokens (`SamplingParams.logprobs`): the sampled token's log-probability and the
top-k alternatives of its row; for prompt tokens (`prompt_logprobs`, echo): the
log-probability of each prompt token under the logits of the position before it, and the
top-k there (the first prompt token has none). Both come from the raw logits the model
computed, before temperature, penalties or any cut (vLLM's default), as a log-softmax in
float32. `token_logprobs` runs on the logits' device right after sampling (nothing waits);
`StepLogprobs.to_host` starts their copy to pinned memory with the step's tokens, and
`attach_prompts` (when the step is read back) hands the results to the requests.
A step that asks for none pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lamina.driver.request import Request
from megatron_lamina.requests.output import TokenLogprob
from megatron_lamina.requests.sampling_params import SamplingParams
from megatron_lamina.plan import SequenceChunk


@dataclass
class _Part:
    """Log-probabilities of some rows: the chosen tokens' and the top-k alternatives'."""

    chosen: torch.Tensor        # [rows] float32
    top_values: torch.Tensor    # [rows, k] float32
    top_ids: torch.Tensor       # [rows, k] int64
    counts: list[int]           # how many alternatives each row reports (<= k)

    @classmethod
    def of(cls, logits: torch.Tensor, targets: torch.Tensor, counts: list[int]) -> "_Part":
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs.gather(1, targets[:, None])[:, 0]
        top = logprobs.topk(max(counts), dim=-1) if max(counts) else None
        empty = logprobs.new_empty(len(counts), 0)
        return cls(chosen, top.values if top else empty, top.indices if top else empty.long(), counts)

    def to_host(self) -> "_Part":
        def pinned(t: torch.Tensor) -> torch.Tensor:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            return host
        return _Part(pinned(self.chosen), pinned(self.top_values), pinned(self.top_ids), self.counts)

    def entries(self) -> list[TokenLogprob]:
        chosen, values, ids = self.chosen.tolist(), self.top_values.tolist(), self.top_ids.tolist()
        return [TokenLogprob(c, list(zip(i[:k], v[:k]))) for c, v, i, k in zip(chosen, values, ids, self.counts)]


@dataclass
class StepLogprobs:
    generated: _Part | None
    generated_rows: list[int]                     # rows of the step's sampled tokens they are for
    prompt: _Part | None
    prompt_targets: list[tuple[Request, int]]     # (request, prompt position) of each prompt row

    def to_host(self) -> "StepLogprobs":
        return StepLogprobs(self.generated and self.generated.to_host(), self.generated_rows,
                            self.prompt and self.prompt.to_host(), self.prompt_targets)

    def attach_prompts(self) -> dict[int, TokenLogprob]:
        """Append the prompt log-probabilities to their requests (positions not filled yet:
        a prompt recomputed after a preemption is not counted twice); return the generated
        tokens' by their row in the step's sampled tokens."""
        if self.prompt is not None:
            for (request, position), entry in zip(self.prompt_targets, self.prompt.entries()):
                if position == len(request.prompt_logprobs):  # [None] for position 0 from the start
                    request.prompt_logprobs.append(entry)
        if self.generated is None:
            return {}
        return dict(zip(self.generated_rows, self.generated.entries()))


def token_logprobs(sampled: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams], logits: torch.Tensor,
                   whole: list[tuple[Request, SequenceChunk, int]]) -> StepLogprobs | None:
    """`sampled` [rows, vocab] and the `tokens` drawn from them with `params`; `logits`, the
    step's logits rows, of which `whole` names the chunks whose every row is there (request,
    chunk, first row) for prompt log-probabilities."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    generated = None
    if rows:
        index = torch.tensor(rows, dtype=torch.long).to(sampled.device, non_blocking=True)
        generated = _Part.of(sampled.index_select(0, index), tokens.index_select(0, index),
                             [params[i].logprobs for i in rows])
    prompt_rows, targets, counts, where = [], [], [], []
    for request, chunk, first in whole:
        prompt = request.prompt_token_ids
        for i in range(len(chunk.tokens)):
            position = chunk.start + i + 1  # the token the logits of this row predict
            if position < len(prompt):
                prompt_rows.append(first + i)
                targets.append(prompt[position])
                counts.append(request.params.prompt_logprobs)
                where.append((request, position))
    prompt = None
    if prompt_rows:
        device = logits.device
        prompt = _Part.of(logits.index_select(0, torch.tensor(prompt_rows).to(device, non_blocking=True)),
                          torch.tensor(targets).to(device, non_blocking=True), counts)
    if generated is None and prompt is None:
        return None
    return StepLogprobs(generated, rows, prompt, where)
