"""Tool calls read back from a model's own output format (`tool_choice: auto`), whole or streamed.

One parser per format, chosen by `server.tool_call_parser` (`auto`: from the chat template):
`hermes` reads `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5, Hermes,
and our prompt for a template that does not render tools), any number of them, the text
before the first one being the message's content; `llama3_json` reads an output that is a
JSON object `{"name": ..., "parameters": {...}}` (LLaMA-3.1/3.2's JSON tool calls; several
separated by `;`), optionally after `<|python_tag|>`. Text that does not parse as calls stays
content, as vLLM's parsers leave it.

`parse` takes a whole output -> (content, calls). A stream (`ToolCallStream`) sends content
as it comes until a call may have begun (the start of the format's marker, held back while
it could still be one), then holds the rest; when the request ends, the held text is parsed
and each call is sent as OpenAI streams one: a delta with its index, id, type and name (and
empty arguments), then its arguments. So the streamed content and arguments concatenate to
the non-streamed answer's.
"""

from __future__ import annotations

import json
import re
from typing import Any

from megatron_lamina.server.tool_calls import tool_call

PARSERS = ("hermes", "llama3_json")
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parser_for(setting: str, chat_template: str | None) -> str:
    """`server.tool_call_parser`, with `auto` read from the template's own call format."""
    if setting != "auto":
        return setting
    template = chat_template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"  # our prompt for a template that does not render tools (server/tool_calls.py)


def marker(parser: str) -> str:
    """What a call's text starts with (llama3_json: the JSON object's brace, first in the output)."""
    return "<tool_call>" if parser == "hermes" else "{"


def parse(parser: str, text: str) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a whole output; no calls: the whole text is content."""
    if parser == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = [_call(body, "arguments") for body in _HERMES_CALL.findall(text[start:])]
        if not calls or any(c is None for c in calls):
            return text, []
        return (text[:start] if text[:start].strip() else None), calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    calls = [_call(part, "parameters") for part in _split_objects(body)]
    if not calls or any(c is None for c in calls):
        return text, []
    return None, calls


def _call(body: str, arguments_key: str) -> dict | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments: Any = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    return tool_call(value["name"], arguments)


def _split_objects(body: str) -> list[str]:
    """`{...}; {...}` -> the JSON texts (LLaMA-3's several calls)."""
    decoder, parts, i = json.JSONDecoder(), [], 0
    while i < len(body):
        try:
            _, end = decoder.raw_decode(body, i)
        except json.JSONDecodeError:
            return [body]
        parts.append(body[i:end])
        i = end
        while i < len(body) and body[i] in " \n\t;":
            i += 1
    return parts


class ToolCallStream:
    """One choice's streamed deltas under `tool_choice: auto`."""

    def __init__(self, parser: str):
        self.parser, self.marker = parser, marker(parser)
        self.text = ""      # the whole output so far
        self.sent = 0       # characters of it sent as content
        self.held = False   # a call may have begun: nothing more is sent until the end
        self.decided = False  # llama3_json: whether the output's start was seen

    def push(self, text: str) -> str:
        """The content to send now for these new characters."""
        self.text += text
        if self.held:
            return ""
        if self.parser == "llama3_json":  # a call is the whole output: decide at its first characters
            if not self.decided:
                head = self.text.lstrip()
                if "<|python_tag|>".startswith(head):
                    return ""
                head = head.removeprefix("<|python_tag|>").lstrip()
                if not head:
                    return ""
                self.decided, self.held = True, head.startswith("{")
                if self.held:
                    return ""
            return self._send(len(self.text))
        start = self.text.find(self.marker, self.sent)
        if start >= 0:
            self.held = True
            return self._send(start)
        return self._send(len(self.text) - _partial_marker(self.text, self.marker))

    def _send(self, end: int) -> str:
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    def finish(self) -> tuple[str, list[dict]]:
        """(content not sent yet, calls) once the output is complete."""
        content, calls = parse(self.parser, self.text)
        if not calls:
            return self._send(len(self.text)), []
        rest = (content or "")[self.sent:] if content else ""
        return rest, calls


def _partial_marker(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
