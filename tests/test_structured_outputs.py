"""Structured outputs (issue 27) on the default model, SmolLM2-135M-Instruct, for real.

One server for the module, disaggregated (1 model worker, 2 attention workers): 32 JSON
schemas (tests/json_schemas.py), each greedy and sampled in one batch, every output
validated with `jsonschema`; the `openai` client's `beta.chat.completions.parse` with pydantic
models; regex, choice, EBNF grammar and json_object in both APIs and in every spelling
(OpenAI's response_format, vLLM's guided_* and structured_outputs); streaming, n > 1,
log-probabilities of the constrained distribution, stop strings and penalties under a
schema; the 400s (an invalid schema, an unsupported keyword, a regex or grammar that does
not compile, one beyond server.max_grammar_chars, a hostile schema past
server.grammar_compile_timeout_s, two constraints) after which the server serves on. The
colocated layout: `megatron_lamina.LLM` with every schema, greedy and sampled, and the
batch job (`lamina generate`) with a schema, a regex, a choice and a refused line.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
import torch
from at_once import at_once
from json_schemas import SCHEMAS
from pydantic import BaseModel, Field
from server_proc import SETUP_CHECKPOINT, running_server, setup_checkpoint, tiny_server_config
from torchrun import lamina

CHECKPOINT = SETUP_CHECKPOINT
MODEL = CHECKPOINT.name
COMPILE_TIMEOUT_S = 1.5
MAX_GRAMMAR_CHARS = 4000
# Six distinct patterns whose token masks take xgrammar about a second each on a CI core:
# past COMPILE_TIMEOUT_S, well under MAX_GRAMMAR_CHARS.
HOSTILE = {"type": "object", "properties": {
    f"p{i}": {"type": "string", "pattern": f"^([a-z]{{1,20}}{c}){{1,50}}$"} for i, c in enumerate("uvwxyz")}}


def _ask(schema: dict) -> list[dict]:
    return [{"role": "user", "content": f"Reply with JSON that matches this schema: {json.dumps(schema)}"}]


def _valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    setup_checkpoint()
    tmp = tmp_path_factory.mktemp("structured")
    config, port = tiny_server_config(
        tmp, CHECKPOINT, scheduler={"micro_batches": 2, "max_batch_size": 64, "max_prefill_tokens": 2048},
        kv_cache={"block_size": 16, "num_blocks": 512},
        server={"grammar_compile_timeout_s": COMPILE_TIMEOUT_S, "max_grammar_chars": MAX_GRAMMAR_CHARS})
    with running_server(config, port, 3, tmp / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key="none", base_url=f"{server.url}/v1", max_retries=0, timeout=300)


def test_every_schema_validates_greedy_and_sampled(client):
    def one(case):
        schema, temperature, seed = case
        response = client.chat.completions.create(
            model=MODEL, messages=_ask(schema), max_tokens=160, temperature=temperature, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}})
        return response.choices[0]

    cases = [(s, 0.0, None) for s in SCHEMAS] + [(s, 1.0, i) for i, s in enumerate(SCHEMAS)]
    answers = at_once(*(lambda case=case: one(case) for case in cases))  # one batch: constrained rows side by side
    for (schema, temperature, _), choice in zip(cases, answers):
        assert choice.finish_reason == "stop", (temperature, schema, choice.message.content)
        _valid(choice.message.content, schema)


class Address(BaseModel):
    city: str = Field(max_length=16)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user"]
    address: Address
    nickname: str | None = Field(None, max_length=8)


def test_openai_parse_with_pydantic_models(client):
    completion = client.beta.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Make up a person who lives in Paris."}],
        response_format=Person, max_tokens=120, temperature=0)
    [choice] = completion.choices
    assert choice.finish_reason == "stop"
    person = choice.message.parsed
    assert isinstance(person, Person) and isinstance(person.address, Address)
    assert 0 <= person.age <= 120 and person.role in ("admin", "user")


def test_regex_choice_grammar_and_json_object_in_every_spelling(client):
    chat = [{"role": "user", "content": "Give me a US phone number."}]
    phone = r"[0-9]{3}-[0-9]{3}-[0-9]{4}"
    colors = ["red", "green", "blue"]
    ebnf = 'root ::= "The answer is " ("yes" | "no") "."'
    requests = []  # (kind, a call that returns the text), all sent at once
    for extra in ({"guided_regex": phone}, {"structured_outputs": {"regex": phone}}):
        requests.append(("regex", lambda extra=extra: client.completions.create(
            model=MODEL, prompt="Call me at", max_tokens=20, temperature=0, extra_body=extra).choices[0].text))
        requests.append(("regex", lambda extra=extra: client.chat.completions.create(
            model=MODEL, messages=chat, max_tokens=20, temperature=0.8, seed=1,
            extra_body=extra).choices[0].message.content))
    for extra in ({"guided_choice": colors}, {"structured_outputs": {"choice": colors}}):
        requests.append(("choice", lambda extra=extra: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Your favourite colour?"}], max_tokens=8,
            temperature=1.0, seed=3, extra_body=extra).choices[0].message.content))
    for extra in ({"guided_grammar": ebnf}, {"structured_outputs": {"grammar": ebnf}}):
        requests.append(("grammar", lambda extra=extra: client.completions.create(
            model=MODEL, prompt="Is the sky blue?", max_tokens=12, temperature=0, extra_body=extra).choices[0].text))
    for extra in ({"response_format": {"type": "json_object"}}, {"structured_outputs": {"json_object": True}}):
        requests.append(("object", lambda extra=extra: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": 'Reply with exactly this JSON: {"ok": true}'}],
            max_tokens=60,
            temperature=0, **({"response_format": extra["response_format"]} if "response_format" in extra else
                              {"extra_body": extra})).choices[0].message.content))
    schema = SCHEMAS[6]
    requests.append(("schema", lambda: client.completions.create(
        model=MODEL, prompt="A person as JSON:", max_tokens=60, temperature=0,
        extra_body={"guided_json": schema}).choices[0].text))
    for (kind, _), text in zip(requests, at_once(*(call for _, call in requests))):
        if kind == "regex":
            assert re.fullmatch(phone, text), text
        elif kind == "choice":
            assert text in colors, text
        elif kind == "grammar":
            assert text in ("The answer is yes.", "The answer is no."), text
        elif kind == "object":
            assert isinstance(json.loads(text), dict), text
        else:
            _valid(text, schema)


def test_streaming_n_logprobs_stop_strings_and_penalties(client):
    schema = SCHEMAS[13]  # nested objects with a patterned string
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": schema}}

    def stream_text() -> str:
        stream = client.chat.completions.create(model=MODEL, messages=_ask(schema), max_tokens=120, temperature=0,
                                                response_format=fmt, stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    whole, streamed, several, answer, cut, short = at_once(
        lambda: client.chat.completions.create(model=MODEL, messages=_ask(schema), max_tokens=120, temperature=0,
                                               response_format=fmt),
        stream_text,
        lambda: client.chat.completions.create(model=MODEL, messages=_ask(schema), max_tokens=120, temperature=1.0,
                                               seed=11, n=3, response_format=fmt,
                                               presence_penalty=1.0, frequency_penalty=0.5,
                                               extra_body={"repetition_penalty": 1.2}),
        lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Is water wet?"}], max_tokens=4, temperature=0,
            logprobs=True, top_logprobs=20, extra_body={"guided_choice": ["yes", "no"]}),
        lambda: client.chat.completions.create(model=MODEL, messages=_ask(SCHEMAS[6]), max_tokens=60, temperature=0,
                                               response_format={"type": "json_schema", "json_schema": {
                                                   "name": "p", "schema": SCHEMAS[6]}}, stop=['"age"']),
        lambda: client.chat.completions.create(model=MODEL, messages=_ask(SCHEMAS[13]), max_tokens=5, temperature=0,
                                               response_format=fmt))
    assert streamed == whole.choices[0].message.content
    _valid(streamed, schema)

    assert [c.index for c in several.choices] == [0, 1, 2]
    for choice in several.choices:
        assert choice.finish_reason == "stop"
        _valid(choice.message.content, schema)

    # The log-probabilities are those of the constrained distribution: the tokens the grammar
    # allows at the first position ("y", "n", ... prefixes of the two choices) hold all of it.
    first = answer.choices[0].logprobs.content[0]
    assert first.logprob == first.top_logprobs[0].logprob
    assert math.isclose(sum(math.exp(t.logprob) for t in first.top_logprobs), 1.0, abs_tol=1e-3)
    assert answer.choices[0].message.content in ("yes", "no")

    assert cut.choices[0].finish_reason == "stop" and '"age"' not in cut.choices[0].message.content
    assert short.choices[0].finish_reason == "length"  # the grammar cannot complete: the partial output
    assert whole.choices[0].message.content.startswith(short.choices[0].message.content)


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", 'Unsupported type "foo"'),
    ({"guided_json": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}, "guided_json",
     "unsupported JSON-schema keyword 'not' at #/properties/a"),
    ({"guided_regex": "[0-9"}, "guided_regex", "invalid regex constraint"),
    ({"structured_outputs": {"grammar": 'root ::= "a" | b'}}, "structured_outputs", 'Rule "b" is not defined'),
    ({"guided_regex": "a" * (MAX_GRAMMAR_CHARS + 1)}, "guided_regex", "at most 4000 are allowed"),
    ({"guided_json": HOSTILE}, "guided_json", "did not compile within server.grammar_compile_timeout_s"),
    ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex", "one output constraint"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
      "tool_choice": "required"}, "tools", 'Unsupported type "foo"'),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools", "dictionary"),
])
def test_bad_constraints_get_400_and_the_server_serves_on(server, client, body, param, message):
    answer = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == param and message in error["message"], error
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert again.choices[0].finish_reason == "length"
    assert "error:" not in server.output()  # the engine never saw the request


def test_openai_fields_that_change_nothing_are_accepted(client):
    plain, sent = at_once(
        lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=6, temperature=0),
        lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, store=False,
            metadata={"team": "eval"}, service_tier="auto", reasoning_effort="low", modalities=["text"],
            parallel_tool_calls=True, user="u-1", prediction={"type": "content", "content": "Hello"}))
    assert sent.choices[0].message.content == plain.choices[0].message.content


def test_llm_colocated_every_schema_greedy_and_sampled(monkeypatch):
    from megatron_lamina import LLM, SamplingParams
    from megatron_lamina.requests.structured_output import StructuredOutput

    cases = [(s, SamplingParams(max_tokens=160, temperature=t, seed=i if t else None,
                                structured_outputs=StructuredOutput.json_schema(s)))
             for t in (0.0, 1.0) for i, s in enumerate(SCHEMAS)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside the module's server ranks: more OpenMP threads than cores spin
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # so that LLM keeps that one thread
    try:
        with LLM(str(CHECKPOINT), max_batch_size=64) as llm:
            outputs = llm.chat([_ask(s) for s, _ in cases], [p for _, p in cases])
    finally:
        torch.set_num_threads(threads)
    for (schema, _), out in zip(cases, outputs):
        assert out.finish_reason == "stop", (schema, out.text)
        _valid(out.text, schema)


def test_batch_job_with_constraints(tmp_path: Path):
    config, _ = tiny_server_config(tmp_path, CHECKPOINT, parallel={"attention_workers": 0},
                                   scheduler={"micro_batches": 1, "max_batch_size": 8, "max_prefill_tokens": 512},
                                   kv_cache={"block_size": 16, "num_blocks": 128})
    schema = SCHEMAS[13]
    lines = [{"id": "schema", "messages": _ask(schema), "max_tokens": 120, "temperature": 0,
              "response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": schema}}},
             {"id": "regex", "prompt": "Call me at", "max_tokens": 20, "guided_regex": r"[0-9]{3}-[0-9]{4}"},
             {"id": "choice", "prompt": "Yes or no?", "max_tokens": 5, "structured_outputs": {"choice": ["yes", "no"]}},
             {"id": "bad", "prompt": "x", "guided_json": {"type": "object", "if": {}}}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = lamina("generate", "--config", str(config), "--input", str(source), "--output", str(tmp_path / "out.jsonl"))
    assert result.returncode == 1, result.stderr[-3000:]  # the refused line fails, the others run
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    _valid(records["schema"]["text"], schema)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", records["regex"]["text"])
    assert records["choice"]["text"] in ("yes", "no")
    assert records["bad"]["finish_reason"] == "error"
    assert "unsupported JSON-schema keyword 'if'" in records["bad"]["error"]
