"""The one validator of sampling parameters: each field's rule, written once (torch-free).

`SamplingParams` (`driver/sampling.py`, what `megatron_lamina.LLM` takes) checks every field
with these rules when it is built; the request schema (`requests/request_schema.py`: the
server's bodies and the batch job's lines) applies the same rule to each field once pydantic
has checked its type. So the server, the batch job and `LLM` accept and refuse the same
values with the same words: `check_field(name, value)` raises a ValueError whose text says
what is allowed ("must be a number in [0, 2]"), and each caller puts the field's name in
front. The bounds are OpenAI's where OpenAI has the field (temperature, top_p, the
penalties, logit_bias, logprobs) and vLLM's otherwise (top_k, min_p, repetition_penalty > 0,
seed), with two differences from vLLM: temperature and repetition_penalty are at most 2 (as
OpenAI and our server always had them), and stop strings are limited in count and length
(`MAX_STOP_STRINGS`, `MAX_STOP_CHARS`), since every stop string is searched for after every
token of its request and a flood of them slowed every other request; stop token ids likewise
(`MAX_STOP_TOKEN_IDS`), since each is compared with every token.
"""

from __future__ import annotations

import math
from typing import Any, Callable

MAX_TEMPERATURE = 2.0
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 100.0


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Range:
    """A number (or integer) in [low, high]; `above`: low itself excluded; `optional`: null too."""

    def __init__(self, low: float, high: float | None = None, *, above: bool = False, integer: bool = False,
                 optional: bool = False):
        self.low, self.high, self.above, self.integer, self.optional = low, high, above, integer, optional

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if not (is_integer(value) if self.integer else is_number(value) and math.isfinite(value)):
            return False
        if value < self.low or self.above and value == self.low:
            return False
        return self.high is None or value <= self.high

    def __call__(self, value: Any) -> str | None:
        return None if self.allows(value) else f"must be {self}"

    def __str__(self) -> str:
        noun = "an integer" if self.integer else "a number"
        if self.high is None:
            text = f"{noun} {'>' if self.above else '>='} {self.low:g}"
        elif self.integer:
            text = f"{noun} in {self.low}..{self.high}"
        else:
            text = f"{noun} in {'(' if self.above else '['}{self.low:g}, {self.high:g}]"
        return f"null or {text}" if self.optional else text


def _stop_strings(stop: Any) -> str | None:
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        return "must be a string or a list of strings"
    if len(stop) > MAX_STOP_STRINGS:
        return f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}"
    if not all(stop):
        return "stop strings must not be empty"
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_CHARS:
        return f"a stop string may have at most {MAX_STOP_CHARS} characters, got one of {longest}"
    return None


_TOKEN_ID = Range(0, integer=True)
_BIAS = Range(-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)


def _token_ids(ids: Any) -> str | None:
    if not (isinstance(ids, list) and all(map(_TOKEN_ID.allows, ids))):
        return "must be a list of token ids (integers >= 0)"
    if len(ids) > MAX_STOP_TOKEN_IDS:
        return f"at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed, got {len(ids)}"
    return None


def _logit_bias(bias: Any) -> str | None:
    if bias is None or isinstance(bias, dict) and all(_TOKEN_ID.allows(t) and _BIAS.allows(b)
                                                      for t, b in bias.items()):
        return None
    return f"must map token ids to biases in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"


RULES: dict[str, Callable[[Any], str | None]] = {
    "temperature": Range(0.0, MAX_TEMPERATURE),         # < SamplingParams.GREEDY_BELOW: greedy
    "top_p": Range(0.0, 1.0, above=True),
    "top_k": Range(-1, integer=True),                   # -1 or 0: no top-k cut
    "min_p": Range(0.0, 1.0),
    "seed": Range(*SEED_RANGE, integer=True, optional=True),
    "min_tokens": Range(0, integer=True),
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    "repetition_penalty": Range(0.0, 2.0, above=True),  # < SamplingParams.MIN_REPETITION_PENALTY: that
    "stop": _stop_strings,                              # a list (a lone string is a list of one)
    "stop_token_ids": _token_ids,
    "logit_bias": _logit_bias,                          # token id (int) -> bias
    "logprobs": Range(0, MAX_LOGPROBS, integer=True, optional=True),
    "prompt_logprobs": Range(0, MAX_LOGPROBS, integer=True, optional=True),
}


def check_field(name: str, value: Any) -> Any:
    """`value` if field `name` allows it; otherwise a ValueError saying what is allowed."""
    problem = RULES[name](value)
    if problem is not None:
        raise ValueError(problem)
    return value
