"""OpenAI request bodies (completions, chat completions), checked field by field.

Pydantic models with `extra="forbid"`: an unknown field, a wrong type or a value out of range
becomes an `ApiError` (HTTP 400, OpenAI error body) naming the field. Fields of OpenAI's API
that we accept but do not implement must keep their neutral value (`n` 1, penalties 0, no
logprobs, no echo, no logit_bias). Extensions, as in vLLM: `top_k`, `ignore_eos`,
`min_tokens` (EOS and stop strings do not end a request before it), `return_token_ids`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from megatron_lamina.engine.llm_engine import PromptInput
from megatron_lamina.engine.sampling import SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logprobs: Literal[False] | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    return_token_ids: bool = False

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise ApiError(400, "stop strings must not be empty", "stop")
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos,
                              min_tokens=self.min_tokens)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str]
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    suffix: None = None

    def prompt_input(self) -> PromptInput:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError(400, "only one prompt per request is supported (n=1)", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "the prompt is empty", "prompt")
        if isinstance(prompt, list):
            return PromptInput(prompt_token_ids=prompt)
        return PromptInput(prompt=prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def plain(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def prompt_input(self) -> PromptInput:
        return PromptInput(messages=[m.plain() for m in self.messages])


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """FastAPI/pydantic validation errors -> one OpenAI error naming the first bad field."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('msg')}", None)
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"unknown field '{'.'.join(loc)}'", ".".join(loc) or None)
    if not loc:
        return ApiError(400, str(first.get("msg")), None)
    # OpenAI names the top-level field in `param`; the message keeps the whole path.
    return ApiError(400, f"{'.'.join(loc)}: {first.get('msg')}", loc[0])
