"""What a caller sees of a running request: increments of tokens and text.

`OutputTracker` turns the driver's growing `Request` into `RequestOutput` deltas for
streaming. Text that might still change is held back: characters that could be the start of
a stop string (the final text ends before the stop string, so they may vanish) and a
trailing replacement character (half of a multi-byte character whose other bytes come with
the next token). Concatenating all deltas gives exactly the final text.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lamina.driver.request import Request, TokenLogprob


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


class OutputTracker:
    def __init__(self, request: Request):
        self.request = request
        self.sent_text = 0
        self.sent_tokens = 0
        self.sent_prompt = request.params.prompt_logprobs is None
        self.holdback = max((len(s) for s in request.params.stop), default=1) - 1

    def next_output(self, error: str | None = None) -> RequestOutput:
        r = self.request
        error = error if error is not None else r.error  # the engine's, or this request's own failure
        finished = r.finished or error is not None
        end = len(r.text)
        if not finished:
            end = max(self.sent_text, end - self.holdback)
            while end > self.sent_text and r.text[end - 1] == "\ufffd":
                end -= 1
        out = RequestOutput(
            request_id=r.request_id, text=r.text[self.sent_text:end],
            token_ids=r.output_token_ids[self.sent_tokens:], finished=finished,
            finish_reason="error" if error is not None else r.finish_reason,
            prompt_tokens=len(r.prompt_token_ids), completion_tokens=len(r.output_token_ids), error=error,
            cached_tokens=max(r.num_cached_tokens, 0),
        )
        if r.params.logprobs is not None:
            out.logprobs = r.output_logprobs[self.sent_tokens:]
        if not self.sent_prompt and (len(r.prompt_logprobs) >= len(r.prompt_token_ids) or finished):
            out.prompt_logprobs, self.sent_prompt = list(r.prompt_logprobs), True
        self.sent_text, self.sent_tokens = end, len(r.output_token_ids)
        return out
