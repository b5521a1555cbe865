"""Offline batch jobs: parse the JSONL input, write the JSONL output (driver only).

Each input line is `{"id", "prompt"}` or `{"id", "messages"}` with optional `max_tokens`,
`temperature`, `top_p`, `top_k`, `seed`, `stop`, `ignore_eos`. A line that is not valid
JSON, lacks an id, has both or neither of prompt/messages, an unknown field or a value of
the wrong type becomes a `BatchLine` with an `error` that names the line number and the
field; the job writes it as an error record and runs the other lines. Output records are
`{"id", "text", "token_ids", "finish_reason"}` (plus `"error"` for failed lines), appended
and flushed one by one as requests finish; `completed_keys` reads them back for `--resume`.
Ids are the job's keys: a resumed job skips every id already in the output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from megatron_lamina.engine.llm_engine import PromptInput
from megatron_lamina.engine.sampling import SamplingParams

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
_TYPES = {"max_tokens": int, "temperature": (int, float), "top_p": (int, float), "top_k": int,
          "seed": int, "ignore_eos": bool}


@dataclass
class BatchLine:
    line_no: int
    id: object
    item: PromptInput | None = None
    error: str | None = None

    @property
    def key(self):
        """What identifies the line in the output: its id, or its line number if it has none."""
        return self.id if self.id is not None else ("line", self.line_no)

    def error_record(self) -> dict:
        return {"id": self.id, "line": self.line_no, "error": self.error, "finish_reason": "error"}


def parse_line(line_no: int, text: str) -> BatchLine:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return BatchLine(line_no, None, error=f"line {line_no}: invalid JSON ({e.msg} at column {e.colno})")
    if not isinstance(record, dict):
        return BatchLine(line_no, None, error=f"line {line_no}: expected a JSON object")
    rid = record.get("id")

    def bad(message: str) -> BatchLine:
        return BatchLine(line_no, rid, error=f"line {line_no}: {message}")

    if rid is None or isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return bad("'id' is required and must be a string or an integer")
    unknown = set(record) - {"id", "prompt", "messages", *SAMPLING_FIELDS}
    if unknown:
        return bad(f"unknown field(s) {sorted(unknown)}; allowed: id, prompt, messages, "
                   + ", ".join(SAMPLING_FIELDS))
    if ("prompt" in record) == ("messages" in record):
        return bad("exactly one of 'prompt' and 'messages' is required")
    prompt, messages = record.get("prompt"), record.get("messages")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        return bad("'prompt' must be a non-empty string")
    if messages is not None and not (
        isinstance(messages, list) and messages
        and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages)
    ):
        return bad("'messages' must be a non-empty list of {\"role\": str, \"content\": str}")
    kwargs = {k: record[k] for k in SAMPLING_FIELDS if k in record}
    for key, types in _TYPES.items():
        value = kwargs.get(key)
        if value is not None and (not isinstance(value, types) or (types is not bool and isinstance(value, bool))):
            return bad(f"'{key}' has the wrong type ({type(value).__name__})")
    try:
        params = SamplingParams(**kwargs)
    except (TypeError, ValueError) as e:
        return bad(str(e))
    return BatchLine(line_no, rid, PromptInput(prompt=prompt, messages=messages, params=params, user_id=rid))


def read_batch(path: str | Path) -> list[BatchLine]:
    lines = []
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if text.strip():
                lines.append(parse_line(line_no, text))
    return lines


def write_record(out: IO[str], record: dict) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()


def completed_keys(path: str | Path) -> set:
    """Keys (see `BatchLine.key`) already recorded in an output file. A last line cut short by a kill is removed
    (its request runs again), so appending after it keeps the file valid JSONL."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        path.write_bytes(complete)
    keys = set()
    for line in complete.decode("utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            keys.add(record["id"] if record["id"] is not None else ("line", record["line"]))
    return keys
