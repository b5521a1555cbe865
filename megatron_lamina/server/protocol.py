"""OpenAI request bodies (completions, chat completions, tokenize, detokenize) and error bodies.

The bodies are the shared request schema (`requests/request_schema.py`: the sampling fields,
prompt and chat messages, strict types, limits) plus the fields only HTTP has: `n`
independent samples per prompt (seeded `seed`, `seed + 1`, ...), several prompts in one
completion request, log-probabilities (completions: `logprobs` 0..20 and `echo`; chat:
`logprobs` and `top_logprobs`), `stream`, structured outputs (`response_format`, vLLM's
`guided_*` and `structured_outputs`: `requests/structured_fields.py`) and, in chat, `tools`
and `tool_choice` (`server/tool_calls.py`). Fields OpenAI's clients send that change nothing
here are accepted and ignored, as vLLM does (`user`, `store`, `metadata`, `service_tier`,
`reasoning_effort`, `prediction`, `parallel_tool_calls` beyond a forced call, `modalities`
["text"]); fields we do not implement are accepted at their neutral value only (`suffix`
null, `best_of` equal to `n`, no tools in completions); any other value is a 400 saying it
is not supported. Extensions, as in vLLM: `top_k`, `min_p`, `repetition_penalty`,
`stop_token_ids`, `ignore_eos`, `min_tokens` (EOS and stop strings do not end a request
before it), `return_token_ids`. `read_body` turns the bytes of a POST into one of them;
every mistake is an `ApiError` (HTTP 4xx, OpenAI error body) naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from megatron_lamina.requests.prompt import PromptInput
from megatron_lamina.requests.request_schema import (
    SEED_MAX, ChatMessage, LogprobCount, Prompts, RequestError, SamplingFields, StrictModel, decode_json,
    may_hold_surrogates, only_null, parse_request, prompt_input,
)
from megatron_lamina.requests.sampling_params import SamplingParams
from megatron_lamina.requests.structured_fields import StructuredFields
from megatron_lamina.requests.structured_output import StructuredOutput
from megatron_lamina.server.tool_calls import NamedToolChoice, Tool, ToolChoice, forced_output

JSON_TYPES = ("application/json",)
MAX_N = 16  # samples per prompt
MAX_TOOLS = 128  # OpenAI's limit


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    @classmethod
    def invalid(cls, error: RequestError) -> "ApiError":
        return cls(400, error.message, error.param)

    def body(self) -> dict[str, Any]:
        # Echoed input must not hold a lone surrogate: the body could not be encoded.
        return {"error": {"message": _utf8(self.message), "type": self.type, "param": _utf8(self.param),
                          "code": self.code}}


def _utf8(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


class StreamOptions(StrictModel):
    include_usage: bool = False


class _OpenAIFields(StructuredFields, SamplingFields):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    return_token_ids: bool = False
    # Sent by OpenAI's clients; they change nothing in the output, and are ignored as vLLM does.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    prediction: dict[str, Any] | None = None  # predicted output: a speed hint only
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value):
        if value is not None and set(value) - {"text"}:
            raise ValueError('only ["text"] is supported (no audio output)')
        return value

    def check(self) -> None:
        super().check()
        if self.seed is not None and self.seed + self.n - 1 > SEED_MAX:
            raise RequestError(f"seed: with n = {self.n} the samples take seeds seed .. seed + {self.n - 1}, "
                               f"which must be <= {SEED_MAX}", "seed")

    def sample_params(self, params: SamplingParams) -> list[SamplingParams]:
        """The `n` samples' parameters: sample i seeded `seed + i` (unseeded: each its own
        random generator), so the n samples differ and a seeded request repeats."""
        return params.samples(self.n)


class CompletionRequest(_OpenAIFields):
    prompt: Prompts
    tools: Any = None         # a chat feature: accepted at its neutral value only
    tool_choice: Any = None
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt (with echo), generate nothing
    echo: bool = False
    logprobs: LogprobCount | None = None
    best_of: int | None = None
    suffix: Any = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value):
        if value not in (None, []):
            raise ValueError("tools are a chat feature: use /v1/chat/completions")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value):
        if value not in (None, "none"):
            raise ValueError("tools are a chat feature: use /v1/chat/completions")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        return only_null(value, "insertion")

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens: 0 generates nothing and is allowed only with echo: true (to score "
                               "the prompt)", "max_tokens")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError(f"best_of: only best_of = n ({self.n}) is supported (no server-side ranking)",
                               "best_of")

    def prompt_inputs(self) -> list[PromptInput]:
        return [prompt_input(prompt=p) for p in self.prompt]

    def default_max_tokens(self, prompt_tokens: int, max_model_len: int) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(top-N per generated token, per prompt token) the engine computes; scoring a prompt
        (max_tokens 0) needs the prompt's even when no log-probabilities are reported."""
        prompt = self.logprobs if self.echo else None
        if self.max_tokens == 0 and prompt is None:
            prompt = 0
        return self.logprobs, prompt


class ChatCompletionRequest(_OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: LogprobCount | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None

    def check(self) -> None:
        names = [t.function.name for t in self.tools or []]  # before super(): its constraint reads the tools
        if len(set(names)) != len(names):
            raise RequestError("tools: function names must be unique", "tools")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise RequestError(f"tool_choice: no tool named {choice.function.name!r} in tools", "tool_choice")
        if choice not in (None, "none", "auto") and not names:
            raise RequestError("tool_choice: needs tools", "tool_choice")
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs: needs logprobs: true", "top_logprobs")
        other = StructuredFields.constraint(self)
        if self.tool_mode in ("required", "named") and other is not None:
            raise RequestError(f"tool_choice: a forced tool call and {other[1]} both constrain the output; send one",
                               "tool_choice")
        for i, tool in enumerate(self.tools or []):
            if tool.function.parameters is not None:
                try:
                    StructuredOutput.json_schema(tool.function.parameters)
                except ValueError as e:
                    raise RequestError(f"tools.{i}.function.parameters: {e}", "tools") from None

    @property
    def tool_mode(self) -> str | None:
        """None (no tools, or tool_choice none), "auto", "required" or "named"."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def forced_tool_output(self) -> StructuredOutput | None:
        if self.tool_mode not in ("required", "named"):
            return None
        return forced_output(self.tools, self.tool_choice, self.parallel_tool_calls is not False)

    def constraint(self):
        found = super().constraint()
        if found is None and (forced := self.forced_tool_output()) is not None:
            return forced, "tools"
        return found

    def prompt_inputs(self) -> list[PromptInput]:
        return [prompt_input(messages=self.messages)]

    def default_max_tokens(self, prompt_tokens: int, max_model_len: int) -> int:
        """The rest of the context unless max_completion_tokens or max_tokens says less."""
        return self.max_completion_tokens or self.max_tokens or max_model_len - prompt_tokens

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None


class TokenizeRequest(StrictModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True        # a prompt's; a chat's come from its template
    add_generation_prompt: bool = True     # a chat's

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise RequestError("exactly one of 'prompt' and 'messages' is required", "prompt")


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[int]


def read_body(content_type: str | None, raw: bytes, model: type[StrictModel]) -> StrictModel:
    """The body of a POST -> `model`. JSON is expected; a body without a content-type header is
    read as JSON too (curl -d without -H), any other declared type is a 415."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type and media_type not in JSON_TYPES and not media_type.endswith("+json"):
        raise ApiError(415, f"content-type {media_type!r} is not supported: send the body as JSON with the "
                            "header 'content-type: application/json'", None, code="unsupported_media_type")
    try:
        return parse_request(model, decode_json(raw), may_hold_surrogates(raw))
    except RequestError as e:
        if not raw.strip():
            raise ApiError(400, "the request body is empty: send a JSON object") from None
        raise ApiError.invalid(e) from None
