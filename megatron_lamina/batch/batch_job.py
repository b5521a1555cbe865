"""Offline batch jobs: the JSONL input, line by line, into checked requests (driver only).

Each input line is `{"id", "prompt"}` or `{"id", "messages"}` plus the sampling fields of
the shared request schema (`requests/request_schema.py`: `max_tokens` (default 16),
`temperature`, `top_p`, `top_k`, `min_p`, `seed`, `stop`, `stop_token_ids`, `ignore_eos`,
`min_tokens`, `presence_penalty`, `frequency_penalty`, `repetition_penalty`, `logit_bias`,
and an output constraint: `response_format`, `guided_*` or `structured_outputs`, as
`requests/structured_fields.py` reads them), checked exactly as the server checks them, and the log-probabilities it wants (`logprobs`:
top-N per generated token, `prompt_logprobs`: per prompt token; 0..20; `max_tokens: 0` with
`prompt_logprobs` scores the prompt only). The file is read as bytes, so a line that is not
UTF-8 spoils only itself. Every non-blank line becomes one `BatchLine`; a line that cannot
run (not UTF-8, not JSON, a field the schema refuses, an id seen on an earlier line) carries
an `error` that names the line number and the field, and the job writes it as an error
record and runs the others.
Ids are the job's keys: a line's `key` is its id, or `("line", N)` for a line without a
usable id (none, the wrong type, or a duplicate, whose error names the first line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator

from megatron_lamina.requests.prompt import PromptInput
from megatron_lamina.requests.request_schema import (
    ChatMessage,
    LogprobCount,
    Prompt,
    RequestError,
    SamplingFields,
    decode_json,
    is_unicode,
    may_hold_surrogates,
    parse_request,
    prompt_input,
)
from megatron_lamina.requests.structured_fields import StructuredFields

DEFAULT_MAX_TOKENS = 16


class BatchRequest(StructuredFields, SamplingFields):
    """One input line: the shared sampling fields, an id, and a prompt or chat messages."""

    id: str | int
    prompt: Prompt | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt (with prompt_logprobs)
    logprobs: LogprobCount | None = None
    prompt_logprobs: LogprobCount | None = None

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' and 'messages' is required")
        return self

    def check(self) -> None:
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise RequestError("max_tokens: 0 generates nothing and is allowed only with prompt_logprobs (to "
                               "score the prompt)", "max_tokens")

    def prompt_input(self) -> PromptInput:
        max_tokens = DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        params = self.sampling_params(max_tokens, self.logprobs, self.prompt_logprobs)
        return prompt_input(self.prompt, self.messages, params=params, user_id=self.id, cache_salt=self.cache_salt)


@dataclass
class BatchLine:
    line_no: int
    id: str | int | None             # None: no usable id (the record's id is null)
    item: PromptInput | None = None
    error: str | None = None

    @property
    def key(self):
        """What identifies the line in the output: its id, or its line number if it has none."""
        return self.id if self.id is not None else ("line", self.line_no)

    def fail(self, message: str) -> None:
        self.item, self.error = None, f"line {self.line_no}: {message}"

    def error_record(self) -> dict:
        return {"id": self.id, "line": self.line_no, "error": self.error, "finish_reason": "error"}


def parse_line(line_no: int, raw: bytes) -> BatchLine:
    try:
        data = decode_json(raw)
    except RequestError as e:
        return BatchLine(line_no, None, error=f"line {line_no}: {e.message}")
    rid = data.get("id") if isinstance(data, dict) else None
    line = BatchLine(line_no, rid if type(rid) is int or isinstance(rid, str) and is_unicode(rid) else None)
    try:
        line.item = parse_request(BatchRequest, data, may_hold_surrogates(raw)).prompt_input()
    except RequestError as e:
        line.fail(e.message)
    return line


def read_batch(path: str | Path, max_line_bytes: int | None = None) -> list[BatchLine]:
    """Every non-blank line of the file, parsed; a repeated id makes that line an error, and
    so does one longer than `max_line_bytes` (server.max_body_mb: what the server takes)."""
    lines, first_line = [], {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            if not raw.strip():
                continue
            if max_line_bytes is not None and len(raw) > max_line_bytes:  # never parsed nor tokenized
                lines.append(BatchLine(line_no, None, error=f"line {line_no}: {len(raw)} bytes; a line may have at "
                                       f"most {max_line_bytes // 2**20} MiB (server.max_body_mb)"))
                continue
            line = parse_line(line_no, raw)
            if line.id is not None and line.id in first_line:
                duplicate = line.id
                line.id = None
                line.fail(f"duplicate id {duplicate!r} (first on line {first_line[duplicate]}); "
                          "ids are the job's keys")
            elif line.id is not None:
                first_line[line.id] = line_no
            lines.append(line)
    return lines
