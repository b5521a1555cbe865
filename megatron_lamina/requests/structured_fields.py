"""The request fields that constrain the output, in every spelling OpenAI and vLLM accept.

Mixed into the server's bodies (`server/protocol.py`) and the batch job's line
(`batch/batch_job.py`) in front of `SamplingFields`, so both take the same fields:
OpenAI's `response_format` (`{"type": "json_object"}`, `{"type": "json_schema",
"json_schema": {"name", "schema", "strict", "description"}}`), vLLM's older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and its newer `structured_outputs` object
(`json`, `regex`, `choice`, `grammar`, `json_object`). At most one constraint per request
(vLLM's rule too). `constraint` turns them into one `StructuredOutput` and the field it came
from (the `param` of a 400 about it); `sampling_params` puts it in the request's
`SamplingParams`. vLLM's options that would change the output in a way not built here
(`whitespace_pattern`, `structural_tag`) are refused; those that change nothing here are
accepted: the backend's name (there is one), `disable_fallback`, `disable_any_whitespace`
(whitespace is always compact) and `disable_additional_properties` (a schema without
`additionalProperties` already allows no other property: xgrammar's strict mode).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from megatron_lamina.requests.request_schema import RequestError, StrictModel, only_null
from megatron_lamina.requests.sampling_params import SamplingParams
from megatron_lamina.requests.structured_output import StructuredOutput

BACKENDS = ("auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer")


class JsonSchemaFormat(StrictModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema", and only with it')
        return self


class StructuredOutputsParams(StrictModel):
    """vLLM's `structured_outputs` object (its StructuredOutputsParams)."""

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    whitespace_pattern: str | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    model_config = ConfigDict(populate_by_name=True)

    @field_validator("structural_tag", "whitespace_pattern")
    @classmethod
    def _not_built(cls, value):
        return only_null(value)


class StructuredFields(StrictModel):
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: StructuredOutputsParams | None = None

    @field_validator("guided_decoding_backend")
    @classmethod
    def _known_backend(cls, value):
        if value is not None and value.split(":")[0] not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}; xgrammar serves every request (known: {', '.join(BACKENDS)})")
        return value

    @field_validator("guided_whitespace_pattern")
    @classmethod
    def _no_whitespace_pattern(cls, value):
        return only_null(value, "whitespace in JSON is compact")

    def check(self) -> None:
        super().check()
        self.constraint()  # two constraints, or one that is not well-formed, are refused with the body

    def constraint(self) -> tuple[StructuredOutput, str] | None:
        """The one constraint of the request and the field that set it; RequestError for two."""
        given: list[tuple[str, Any]] = []  # (field, a builder of its StructuredOutput)
        rf = self.response_format
        if rf is not None and rf.type != "text":
            schema = rf.json_schema.schema_ if rf.json_schema is not None else None
            given.append(("response_format", lambda: StructuredOutput.json_schema(schema) if schema is not None
                          else StructuredOutput("json_object")))
        if self.guided_json is not None:
            given.append(("guided_json", lambda: StructuredOutput.json_schema(self.guided_json)))
        if self.guided_regex is not None:
            given.append(("guided_regex", lambda: StructuredOutput("regex", self.guided_regex)))
        if self.guided_choice is not None:
            given.append(("guided_choice", lambda: StructuredOutput.choice(self.guided_choice)))
        if self.guided_grammar is not None:
            given.append(("guided_grammar", lambda: StructuredOutput("grammar", self.guided_grammar)))
        so = self.structured_outputs
        if so is not None:
            for value, build in ((so.json_, lambda: StructuredOutput.json_schema(so.json_)),
                                 (so.regex, lambda: StructuredOutput("regex", so.regex)),
                                 (so.choice, lambda: StructuredOutput.choice(so.choice)),
                                 (so.grammar, lambda: StructuredOutput("grammar", so.grammar)),
                                 (so.json_object or None, lambda: StructuredOutput("json_object"))):
                if value is not None:
                    given.append(("structured_outputs", build))
        if len(given) > 1:
            raise RequestError(f"one output constraint per request; got {', '.join(f for f, _ in given)}",
                               given[1][0])
        if not given:
            return None
        field, build = given[0]
        try:
            return build(), field
        except ValueError as e:
            raise RequestError(f"{field}: {e}", field) from None

    def sampling_params(self, *args, **kwargs) -> SamplingParams:
        params = super().sampling_params(*args, **kwargs)
        found = self.constraint()
        return dataclasses.replace(params, structured_outputs=found[0]) if found else params
