"""The one schema of a generation request, shared by the HTTP server and the batch job.

`server/protocol.py` builds the OpenAI request bodies on `SamplingFields`, `Prompt` and
`ChatMessage`; `engine/batch_job.py` builds its JSONL line on the same pieces, so both take
the same fields with the same limits and answer a mistake with the same message. Input
travels `decode_json` (bytes -> JSON value) -> `parse_request` (JSON value -> model) ->
`prompt_input` / `SamplingFields.sampling_params` (-> what `LLMEngine` takes), and
`check_max_tokens` once the prompt is tokenized. Every mistake is a `RequestError`: one line
naming the field (`param`, the top-level field as OpenAI reports it) and what is allowed.

Hostile input is refused here, before it reaches the tokenizer or torch: strings that are
not valid Unicode (lone surrogates, from an unpaired `\\ud800` escape) anywhere in the
request, booleans where numbers belong (strict types: `true` is no token id), seeds that
`torch.Generator` cannot take, JSON nested too deeply or with numbers too long to convert.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from megatron_lamina.engine.llm_engine import PromptInput
from megatron_lamina.engine.sampling import SamplingParams

SEED_MIN, SEED_MAX = SamplingParams.SEED_RANGE
MAX_TEMPERATURE = 2.0


class RequestError(ValueError):
    """A mistake in a request a client can fix; `param` names its top-level field (or None)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class StrictModel(BaseModel):
    """Unknown fields are refused; no type coercion (`true` is not 1, `"5"` is not 5)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _check_prompt(value: Any) -> str | list[int]:
    """A prompt: a non-empty string, a list of one string, or a non-empty list of token ids."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise ValueError("the prompt is empty")
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        raise ValueError("only one prompt per request is supported (n=1)")
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        return value
    if value == []:
        raise ValueError("the prompt is empty")
    raise ValueError("must be a string, a list of one string, or a list of token ids (integers; true and "
                     "false are not token ids)")


Prompt = Annotated[str | list[int], BeforeValidator(_check_prompt)]


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


NotBool = BeforeValidator(_not_bool)  # for numeric Literal fields, where true == 1 would pass


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def plain(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class SamplingFields(StrictModel):
    """What every generation request may set, with the limits the server and batch job share."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)  # < 1e-5: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, stop):
        if stop is not None and any(not s for s in ([stop] if isinstance(stop, str) else stop)):
            raise ValueError("stop strings must not be empty")
        return stop

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos,
                              min_tokens=self.min_tokens)


def prompt_input(prompt: str | list[int] | None = None, messages: list[ChatMessage] | None = None,
                 **fields: Any) -> PromptInput:
    """A checked prompt (`Prompt`) or chat (`ChatMessage`s) -> the engine's `PromptInput`."""
    if messages is not None:
        return PromptInput(messages=[m.plain() for m in messages], **fields)
    if isinstance(prompt, list):
        return PromptInput(prompt_token_ids=prompt, **fields)
    return PromptInput(prompt=prompt, **fields)


def check_max_tokens(max_tokens: int, prompt_tokens: int, max_model_len: int) -> None:
    """The prompt plus `max_tokens` must fit the model's context."""
    if prompt_tokens + max_tokens > max_model_len:
        raise RequestError(f"max_tokens = {max_tokens} is too large: the prompt has {prompt_tokens} tokens and "
                           f"the model's context is {max_model_len}", "max_tokens")


# ------------------------------------------------------------------------------ parsing

def decode_json(raw: bytes | str) -> Any:
    """UTF-8 bytes (or text) of one JSON value -> the value; RequestError says what is wrong."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                               "send UTF-8 text") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise RequestError(f"invalid JSON ({e.msg.removesuffix(' at')} at {where})") from None
    except RecursionError:
        raise RequestError("invalid JSON (nested too deeply)") from None
    except ValueError:  # an integer with more digits than Python converts (sys.get_int_max_str_digits)
        raise RequestError("invalid JSON (a number too long to read)") from None


def parse_request(model: type[StrictModel], data: Any) -> StrictModel:
    """A decoded JSON value -> `model`, or the RequestError of its first mistake."""
    if not isinstance(data, dict):
        raise RequestError(f"expected a JSON object, got {_json_type(data)}")
    _check_unicode(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise describe_error(e.errors()) from None


def describe_error(errors: list[dict[str, Any]]) -> RequestError:
    """Pydantic's errors -> a RequestError naming the first bad field ('messages.0.role: ...')."""
    # A value that fits no member of a union has an error per member, which adds its type to
    # the location ('content', 'list[TextPart]'); the deepest one says the most.
    first = errors[0]["loc"][:1]
    error = max((e for e in errors if e["loc"][:1] == first), key=lambda e: len(e["loc"]))
    loc = [str(p) for p in error.get("loc", ()) if isinstance(p, int) or _is_field_name(p)]
    path = ".".join(loc)
    kind, message = error.get("type"), str(error.get("msg"))
    if kind == "extra_forbidden":
        return RequestError(f"unknown field '{path}'", loc[0] if loc else None)
    if kind == "missing":
        return RequestError(f"{path}: required", loc[0] if loc else None)
    message = message.removeprefix("Value error, ")
    return RequestError(f"{path}: {message}" if path else message, loc[0] if loc else None)


def _is_field_name(part: Any) -> bool:
    return isinstance(part, str) and part.isidentifier() and part.islower() and part not in (
        "str", "int", "float", "bool", "list", "dict", "none")


def _check_unicode(data: Any) -> None:
    """Every string (keys too) must be encodable as UTF-8; iterative, so depth is no limit."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                _check_string(key, path)
                stack.append((item, path + (key,)))
        elif isinstance(value, list):
            stack.extend((item, path + (i,)) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_string(value, path)


def is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (which no UTF-8 output can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_string(text: str, path: tuple) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        field = ".".join(str(p).encode("utf-8", "backslashreplace").decode() for p in path) or "a key"
        raise RequestError(f"{field}: not valid Unicode (a lone surrogate \\u{ord(text[e.start]):04x} at index "
                           f"{e.start}); send UTF-8 text", str(path[0]) if path else None) from None


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
