"""Log-probabilities in OpenAI's two JSON shapes, from the engine's `TokenLogprob`s.

The engine computes them on the device from the raw logits (log_softmax before temperature,
penalties, bias or any cut: vLLM's default), `driver/logprobs.py`. Completions report, per
token, its text, its log-probability, a map of the top alternatives' texts to theirs (the
token itself always in it, as OpenAI and vLLM do: up to N + 1 entries) and its character
offset in the returned text (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`); a
prompt's first token has none (null). Chat reports a list of `{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}]}` with exactly `top_logprobs` alternatives. A token's
text is its decode alone (`TextCodec.token_text`). Values below -9999 are reported as -9999
(JSON has no -Infinity), as vLLM does.
"""

from __future__ import annotations

from megatron_lamina.requests.output import TokenLogprob
from megatron_lamina.requests.tokenizer import TextCodec

FLOOR = -9999.0


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def completion_logprobs(codec: TextCodec, token_ids: list[int], entries: list[TokenLogprob | None],
                        offset: int) -> tuple[dict, int]:
    """The completions `logprobs` object of these tokens, their text starting at character
    `offset` of the choice's text; and the offset after them."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = codec.token_text(token_id)
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if entry is None:  # a prompt's first token
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_value(entry.logprob))
        top: dict[str, float] = {}
        for alternative, logprob in sorted([*entry.top, (token_id, entry.logprob)], key=lambda t: -t[1]):
            top.setdefault(codec.token_text(alternative), _value(logprob))  # two ids, one text: the likelier
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}, offset


def chat_logprobs(codec: TextCodec, token_ids: list[int], entries: list[TokenLogprob]) -> list[dict]:
    """The chat `logprobs.content` list of these tokens."""
    def item(token_id: int, logprob: float) -> dict:
        text = codec.token_text(token_id)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode("utf-8"))}

    return [{**item(token_id, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in entry.top]}
            for token_id, entry in zip(token_ids, entries, strict=True)]
