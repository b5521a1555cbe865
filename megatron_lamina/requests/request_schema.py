"""The one schema of a generation request, shared by the HTTP server and the batch job.

`server/protocol.py` builds the OpenAI request bodies on `SamplingFields`, `Prompts` and
`ChatMessage`; `batch/batch_job.py` builds its JSONL line on the same pieces, so both take
the same fields with the same limits and answer a mistake with the same message. Input
travels `decode_json` (bytes -> JSON value) -> `parse_request` (JSON value -> model) ->
`prompt_input` / `SamplingFields.sampling_params` (-> what `LLMEngine` takes), and
`check_max_tokens` and `check_token_ids` once the prompt is tokenized. Every mistake is a
`RequestError`: one line naming the field (`param`, the top-level field as OpenAI reports
it) and what is allowed. A model's rules across fields (`check`) run after its fields. The
sampling fields' values are checked by the one validator of sampling parameters
(`requests/sampling_rules.py`), which `SamplingParams`, and so `megatron_lamina.LLM`, apply too:
pydantic checks a field's type, then `sampling_rule` its value.

Hostile input is refused here, before it reaches the tokenizer or torch: strings that are
not valid Unicode (lone surrogates, from an unpaired `\\ud800` escape) anywhere in the
request, booleans where numbers belong (strict types: `true` is no token id), seeds that
`torch.Generator` cannot take, JSON nested too deeply or with numbers too long to convert.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator,
)

from megatron_lamina.requests.prompt import PromptInput, is_token_ids
from megatron_lamina.requests.sampling_params import SamplingParams
from megatron_lamina.requests.sampling_rules import SEED_RANGE, check_field

SEED_MAX = SEED_RANGE[1]
# The longest prompt text (a prompt string, or a chat message's content), checked before it is
# tokenized: a tokenizer holds a few hundred bytes per character while it works, so a 20 MB
# prompt took the front end to gigabytes. 1 Mi characters is several times any context we serve.
MAX_PROMPT_CHARS = 2**20
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,12}")


class RequestError(ValueError):
    """A mistake in a request a client can fix; `param` names its top-level field (or None)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class StrictModel(BaseModel):
    """Unknown fields are refused; no type coercion (`true` is not 1, `"5"` is not 5)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def check(self) -> None:
        """Rules across fields, once every field is valid: a RequestError naming the field."""


def only_null(value: Any, why: str = "") -> Any:
    """A field accepted by name but not built: null passes, anything else is refused."""
    if value is not None:
        raise ValueError(f"not supported{f' ({why})' if why else ''}: send null")
    return value


def _check_chars(text: str, where: str) -> str:
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{where} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    return text


def _one_prompt(value: Any, where: str = "the prompt") -> str | list[int]:
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{where} is empty")
        return _check_chars(value, where)
    if is_token_ids(value):
        return value
    if value == []:
        raise ValueError(f"{where} is empty")
    raise ValueError(f"{where} must be a string or a list of token ids (integers; true and false are not "
                     "token ids)")


def _check_prompts(value: Any) -> list[str | list[int]]:
    """Prompts as OpenAI's completions take them: a string, a list of strings, a list of token
    ids (one prompt), or a list of token-id lists (several)."""
    if isinstance(value, str) or is_token_ids(value):
        return [_one_prompt(value)]
    if isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
        if len(value) == 1:
            return [_one_prompt(value[0])]
        return [_one_prompt(v, f"prompt {i}") for i, v in enumerate(value)]
    if value == []:
        raise ValueError("the prompt is empty")
    raise ValueError("must be a string, a list of strings, a list of token ids, or a list of token-id lists "
                     "(integers; true and false are not token ids)")


def _check_prompt(value: Any) -> str | list[int]:
    """Exactly one prompt, in any of the forms `_check_prompts` takes (a batch job's line)."""
    prompts = _check_prompts(value)
    if len(prompts) > 1:
        raise ValueError("one prompt per line: put each prompt on a line of its own")
    return prompts[0]


Prompt = Annotated[str | list[int], BeforeValidator(_check_prompt)]
Prompts = Annotated[list[str | list[int]], BeforeValidator(_check_prompts)]


def sampling_rule(name: str) -> AfterValidator:
    """The value check of sampling field `name`, run once pydantic has checked its type."""
    return AfterValidator(lambda value: check_field(name, value))


LogprobCount = Annotated[int, sampling_rule("logprobs")]


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


NotBool = BeforeValidator(_not_bool)  # for numeric Literal fields, where true == 1 would pass


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:
            raise ValueError("must be the JSON text of an object") from None
        if not isinstance(value, dict):
            raise ValueError("must be the JSON text of an object")
        return arguments


class MessageToolCall(StrictModel):
    """A tool call of an earlier assistant turn (OpenAI's `message.tool_calls` sent back)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None  # null only in an assistant turn that called tools
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None                 # a tool turn: the call it answers

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: required (null only for an assistant message with tool_calls)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message has them")
        return self

    @field_validator("content")
    @classmethod
    def _not_too_long(cls, content):
        if content is not None:
            _check_chars(content if isinstance(content, str) else "".join(p.text for p in content), "the content")
        return content

    def plain(self) -> dict[str, Any]:
        """What the chat template takes: role and text, and a turn's tool calls (arguments as
        an object, as the templates that render them expect) or the call a tool turn answers."""
        content = self.content if isinstance(self.content, str) or self.content is None \
            else "".join(p.text for p in self.content)
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class SamplingFields(StrictModel):
    """What every generation request may set, with the limits the server and batch job share."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: Annotated[float, sampling_rule("temperature")] = 1.0  # < 1e-5: greedy
    top_p: Annotated[float, sampling_rule("top_p")] = 1.0
    top_k: Annotated[int, sampling_rule("top_k")] = -1
    seed: Annotated[int | None, sampling_rule("seed")] = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, sampling_rule("min_tokens")] = 0
    stop_token_ids: Annotated[list[int] | None, sampling_rule("stop_token_ids")] = None  # end the request like EOS
    min_p: Annotated[float, sampling_rule("min_p")] = 0.0
    presence_penalty: Annotated[float, sampling_rule("presence_penalty")] = 0.0
    frequency_penalty: Annotated[float, sampling_rule("frequency_penalty")] = 0.0
    repetition_penalty: Annotated[float, sampling_rule("repetition_penalty")] = 1.0
    # OpenAI's JSON: token ids as strings ("50256": -100), added to the logits
    logit_bias: dict[str, float] | None = None
    # Only requests with the same salt share prefix-cache blocks (vLLM's field): a tenant's own cache.
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        if stop is not None:
            check_field("stop", [stop] if isinstance(stop, str) else stop)
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, bias):
        for key in bias or {}:
            if not _TOKEN_ID_KEY.fullmatch(key):
                raise ValueError(f"keys must be token ids written as decimal strings (\"50256\"), not {key!r}")
        if bias is not None:
            check_field("logit_bias", {int(k): v for k, v in bias.items()})
        return bias

    def sampling_params(self, max_tokens: int, logprobs: int | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos,
                              min_tokens=self.min_tokens, stop_token_ids=list(self.stop_token_ids or []),
                              min_p=self.min_p, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                              logit_bias=bias, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


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


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Token ids of `logit_bias` must be in the model's vocabulary (vLLM refuses them too)."""
    outside = sorted(t for t in params.logit_bias or {} if t >= vocab_size)
    if outside:
        raise RequestError(f"logit_bias: token ids {outside[:5]} are outside the vocabulary (0..{vocab_size - 1})",
                           "logit_bias")


# ------------------------------------------------------------------------------ parsing

def decode_json(raw: bytes | str) -> Any:
    """UTF-8 bytes (or text) of one JSON value -> the value; RequestError says what is wrong."""
    text = raw
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                               "send UTF-8 text") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise RequestError(f"invalid JSON ({e.msg.removesuffix(' at')} at {where})") from None
    except RecursionError:
        raise RequestError("invalid JSON (nested too deeply)") from None
    except ValueError:  # an integer with more digits than Python converts (sys.get_int_max_str_digits)
        raise RequestError("invalid JSON (a number too long to read)") from None
    return value


def may_hold_surrogates(raw: bytes | str) -> bool:
    """Whether the value decoded from JSON `raw` can hold a lone surrogate. Strict UTF-8 bytes
    hold none: only a \uD800-\uDFFF escape in them makes one. Text may hold one itself."""
    return not isinstance(raw, bytes) or _SURROGATE.search(raw) is not None


def parse_request(model: type[StrictModel], data: Any, surrogates: bool = True) -> StrictModel:
    """A decoded JSON value -> `model`, or the RequestError of its first mistake. `surrogates`:
    whether a string in `data` can hold a lone surrogate (`may_hold_surrogates` of its JSON);
    when it cannot, the walk over every value is skipped (it cost more than decoding the JSON
    of a prompt of token ids)."""
    if not isinstance(data, dict):
        raise RequestError(f"expected a JSON object, got {_json_type(data)}")
    if surrogates:
        _check_unicode(data)
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        raise describe_error(e.errors()) from None
    request.check()
    return request


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


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # the escape of a surrogate half, in JSON bytes


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
