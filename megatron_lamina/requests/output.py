"""What a caller sees of a running request: increments of tokens and text (`RequestOutput`),
with their log-probabilities (`TokenLogprob`). The driver makes them (driver/output_tracker.py);
the front end, the batch job and `LLM` read them. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw logits: before temperature, penalties
    or any cut) and the `top` most likely tokens there, as (token id, log-probability)."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    request_id: int
    text: str                    # new text since the previous output
    token_ids: list[int]         # new tokens since the previous output
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None     # set when the engine failed the request (this one alone, or every one)
    logprobs: list[TokenLogprob] | None = None  # of the new tokens, when the request asked for them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # in the first output, when asked for
    cached_tokens: int = 0       # prompt tokens taken from the prefix cache instead of computed


def error_output(message: str) -> RequestOutput:
    """The only output of a request that never ran: refused or failed before its first step."""
    return RequestOutput(-1, "", [], True, "error", 0, 0, error=message)


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive deltas of one request as one delta (a caller that fell behind)."""
    last = outputs[-1]
    if len(outputs) == 1:
        return last
    logprobs = None if last.logprobs is None else [x for o in outputs for x in (o.logprobs or [])]
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return RequestOutput(last.request_id, "".join(o.text for o in outputs),
                         [t for o in outputs for t in o.token_ids], last.finished, last.finish_reason,
                         last.prompt_tokens, last.completion_tokens, last.error, logprobs, prompt_logprobs,
                         last.cached_tokens)
