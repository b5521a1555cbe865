"""The driver's side of a request's output: `OutputTracker` turns the growing `Request` into
`RequestOutput` deltas (requests/output.py) for streaming. Text that might still change is
held back: characters that could be the start of a stop string (the final text ends before
the stop string, so they may vanish) and a trailing replacement character (half of a
multi-byte character whose other bytes come with the next token). Concatenating all deltas
gives exactly the final text.
"""

from __future__ import annotations

from megatron_lamina.driver.request import Request
from megatron_lamina.requests.output import RequestOutput


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
            cached_tokens=r.cached_tokens,
        )
        if r.params.logprobs is not None:
            out.logprobs = r.output_logprobs[self.sent_tokens:]
        if not self.sent_prompt and (len(r.prompt_logprobs) >= len(r.prompt_token_ids) or finished):
            out.prompt_logprobs, self.sent_prompt = list(r.prompt_logprobs), True
        self.sent_text, self.sent_tokens = end, len(r.output_token_ids)
        return out
