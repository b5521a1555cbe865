"""What a request's output must match: a JSON schema, any JSON object, a regex, a choice or an EBNF grammar.

`StructuredOutput` is the constraint as it travels with a request's `SamplingParams` (front
end -> engine, pickled): a kind and the text the grammar engine compiles, which is also the
compile cache's key (`requests/grammar.py`). The server's and the batch job's fields
(`response_format`, vLLM's `guided_*` and `structured_outputs`, a forced tool call) all end
here, so every spelling means the same constraint. `check` refuses what the grammar engine
(xgrammar) would silently not enforce (JSON-schema keywords it ignores) or cannot parse
(an invalid schema, a regex or EBNF with a syntax error), and what is larger than the
limit, before any request runs; it needs no tokenizer and takes milliseconds. Whitespace
in JSON is compact (", " and ": ", no newlines or indentation): vLLM allows any whitespace by
default, and a small model given that freedom often spends its tokens on blank lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]
KINDS = ("json", "json_object", "regex", "choice", "grammar")
# Keywords xgrammar accepts but does not enforce: an output could break them, so they are refused.
UNSUPPORTED_KEYWORDS = ("not", "if", "then", "else", "dependentSchemas", "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_NOT_SCHEMAS = ("enum", "const", "default", "examples", "required", "description", "title", "dependentRequired")
MAX_CHOICES = 1024


@dataclass(frozen=True)
class StructuredOutput:
    """`kind` and `text`: json (a JSON schema's text), json_object (text unused), regex, choice
    (a JSON list of the strings allowed), grammar (EBNF, as xgrammar and vLLM take it)."""

    kind: Kind
    text: str = ""

    @classmethod
    def json_schema(cls, schema: Any) -> "StructuredOutput":
        """A schema given as a JSON value (dict) or as its text."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be a JSON object")
        return cls("json", json.dumps(schema, ensure_ascii=False))  # key order kept: it is the output's

    @classmethod
    def choice(cls, choices: list[str]) -> "StructuredOutput":
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        if len(choices) > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} choices are allowed, got {len(choices)}")
        return cls("choice", json.dumps(choices, ensure_ascii=False))

    def check(self, max_chars: int) -> None:
        """ValueError naming the problem when the grammar engine cannot take this constraint."""
        import xgrammar as xgr  # the front end and the engine import it; SamplingParams' users need not

        if len(self.text) > max_chars:
            raise ValueError(f"the {self.kind} constraint has {len(self.text)} characters; at most {max_chars} are "
                             "allowed (server.max_grammar_chars)")
        try:
            if self.kind == "json":
                _check_keywords(json.loads(self.text), "#")
                xgr.Grammar.from_json_schema(self.text, any_whitespace=False)
            elif self.kind == "regex":
                xgr.Grammar.from_regex(self.text)
            elif self.kind in ("grammar", "choice"):
                xgr.Grammar.from_ebnf(self.ebnf())
        except RuntimeError as e:  # xgrammar's errors: "[time] file.cc:line: message"
            raise ValueError(f"invalid {self.kind} constraint: {_engine_message(e)}") from None

    def ebnf(self) -> str:
        """The EBNF of a grammar or a choice (a choice is its strings, one of them exactly)."""
        if self.kind == "choice":
            return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(self.text))
        return self.text


def _check_keywords(schema: Any, where: str) -> None:
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            _check_keywords(item, f"{where}/{i}")
        return
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        if key in UNSUPPORTED_KEYWORDS:
            raise ValueError(f"unsupported JSON-schema keyword '{key}' at {where}: the grammar engine cannot enforce "
                             f"it (unsupported: {', '.join(UNSUPPORTED_KEYWORDS)})")
        if key == "allOf" and isinstance(value, list) and len(value) > 1:
            raise ValueError(f"unsupported JSON-schema keyword 'allOf' with {len(value)} members at {where}: the "
                             "grammar engine enforces one member only; merge them into one schema")
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                _check_keywords(sub, f"{where}/{key}/{name}")
        elif key not in _NOT_SCHEMAS:
            _check_keywords(value, f"{where}/{key}")


def _engine_message(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text
