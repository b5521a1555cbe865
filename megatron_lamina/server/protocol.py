"""OpenAI request bodies (completions, chat completions) and error bodies.

The bodies are the shared request schema (`engine/request_schema.py`: the sampling fields,
prompt and chat messages, strict types, limits) plus the fields only HTTP has. Fields of
OpenAI's API that we accept but do not implement must keep their neutral value (`n` 1,
penalties 0, no logprobs, no echo, no logit_bias). Extensions, as in vLLM: `top_k`,
`ignore_eos`, `min_tokens` (EOS and stop strings do not end a request before it),
`return_token_ids`. `read_body` turns the bytes of a POST into one of them; every mistake is
an `ApiError` (HTTP 4xx, OpenAI error body) naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from megatron_lamina.engine.llm_engine import PromptInput
from megatron_lamina.engine.request_schema import (
    ChatMessage, NotBool, Prompt, RequestError, SamplingFields, StrictModel, decode_json, parse_request,
    prompt_input,
)

JSON_TYPES = ("application/json",)


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


class _OpenAIFields(SamplingFields):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[Literal[1], NotBool] = 1
    user: str | None = None
    presence_penalty: Annotated[Literal[0], NotBool] = 0
    frequency_penalty: Annotated[Literal[0], NotBool] = 0
    logprobs: Literal[False] | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    return_token_ids: bool = False


class CompletionRequest(_OpenAIFields):
    prompt: Prompt
    echo: Literal[False] = False
    best_of: Annotated[Literal[1], NotBool] | None = None
    suffix: None = None

    def prompt_input(self) -> PromptInput:
        return prompt_input(prompt=self.prompt)


class ChatCompletionRequest(_OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def prompt_input(self) -> PromptInput:
        return prompt_input(messages=self.messages)


def read_body(content_type: str | None, raw: bytes, model: type[_OpenAIFields]) -> _OpenAIFields:
    """The body of a POST -> `model`. JSON is expected; a body without a content-type header is
    read as JSON too (curl -d without -H), any other declared type is a 415."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type and media_type not in JSON_TYPES and not media_type.endswith("+json"):
        raise ApiError(415, f"content-type {media_type!r} is not supported: send the body as JSON with the "
                            "header 'content-type: application/json'", None, code="unsupported_media_type")
    try:
        return parse_request(model, decode_json(raw))
    except RequestError as e:
        if not raw.strip():
            raise ApiError(400, "the request body is empty: send a JSON object") from None
        raise ApiError.invalid(e) from None
