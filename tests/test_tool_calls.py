"""Tool calling (issue 27) on the default model, SmolLM2-135M-Instruct, through a real server.

One colocated server for the module. Forced calls (`tool_choice: required` and a named
function, greedy and sampled) come back as `message.tool_calls` whose arguments parse and
validate against the tool's schema, with `finish_reason: "tool_calls"`; `parallel_tool_calls:
false` gives one call. `auto` reads the Hermes format from an output crafted with a regex
constraint (the default model's template renders no tools, so the server's parser is hermes)
and leaves plain text as content; the llama3_json parser and `auto`'s choice of parser are
checked on crafted text. Streamed tool-call deltas (id and name first, then argument
fragments) concatenate to the non-streamed answer. The tools reach the prompt, and a
conversation with an assistant's tool calls and `tool` messages is accepted.
"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from at_once import at_once
from server_proc import SETUP_CHECKPOINT, running_server, setup_checkpoint, tiny_server_config

from megatron_lamina.server.tool_calls import Tool, hermes_messages
from megatron_lamina.server.tool_parsers import ToolCallStream, parse, parser_for

CHECKPOINT = SETUP_CHECKPOINT
MODEL = CHECKPOINT.name
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 999}},
       "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
SCHEMA_OF = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    setup_checkpoint()
    tmp = tmp_path_factory.mktemp("tools")
    config, port = tiny_server_config(
        tmp, CHECKPOINT, parallel={"attention_workers": 0},
        scheduler={"micro_batches": 1, "max_batch_size": 16, "max_prefill_tokens": 2048},
        kv_cache={"block_size": 16, "num_blocks": 256})
    with running_server(config, port, 1, tmp / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key="none", base_url=f"{server.url}/v1", max_retries=0, timeout=300)


def _check_calls(calls, names=None) -> None:
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in (names or SCHEMA_OF)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_forced_calls_validate(client, temperature):
    named = {"type": "function", "function": {"name": "add"}}
    cases = (("required", None, None), ("required", False, None), (named, None, ["add"]))
    answers = at_once(*(lambda choice=choice, parallel=parallel: client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=120, temperature=temperature,
        seed=5, **({"parallel_tool_calls": parallel} if parallel is not None else {}))
        for choice, parallel, _ in cases))
    for (_, parallel, names), answer in zip(cases, answers):
        [c] = answer.choices
        assert c.finish_reason == "tool_calls" and c.message.content is None
        _check_calls(c.message.tool_calls, names)
        if parallel is False or names:
            assert len(c.message.tool_calls) == 1


def test_auto_reads_the_models_calls_and_leaves_text_as_content(client):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    crafted = {"guided_regex": re.escape(call)}
    answer, plain, none = at_once(
        lambda: client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto",
                                               max_tokens=60, temperature=0, extra_body=crafted),
        lambda: client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto",
                                               max_tokens=8, temperature=0, extra_body={"guided_regex": "It is sunny"}),
        lambda: client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                               max_tokens=60, temperature=0, extra_body=crafted))
    [c] = answer.choices
    assert c.finish_reason == "tool_calls" and c.message.content is None
    [got] = c.message.tool_calls
    assert got.function.name == "get_weather"
    assert json.loads(got.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert plain.choices[0].message.content == "It is sunny" and not plain.choices[0].message.tool_calls
    assert none.choices[0].message.content == call and not none.choices[0].message.tool_calls


def _streamed(client, **kwargs) -> tuple[str, dict[int, dict], str]:
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:  # a call's first delta: its id and name
                    assert delta.id and delta.function.name, delta
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None and delta.function.name is None, delta
                calls[delta.index]["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}, "auto"])
def test_streamed_deltas_concatenate_to_the_answer(client, choice):
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    extra = {"extra_body": {"guided_regex": re.escape("Sure. " + call)}} if choice == "auto" else {}
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=120, temperature=0, **extra)
    whole, (content, calls, finish) = at_once(lambda: client.chat.completions.create(**kwargs).choices[0],
                                              lambda: _streamed(client, **kwargs))
    assert finish == whole.finish_reason == "tool_calls"
    assert content == (whole.message.content or "")
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    if choice == "auto":
        assert content == "Sure. "


def test_tools_reach_the_prompt_and_tool_messages_are_accepted(client):
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    bare, shown, answer, first = at_once(
        lambda: client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1),
        lambda: client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=1),
        lambda: client.chat.completions.create(model=MODEL, messages=turn, tools=TOOLS, max_tokens=20, temperature=0),
        lambda: client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                               max_tokens=80, temperature=0).choices[0].message)
    assert shown.usage.prompt_tokens > bare.usage.prompt_tokens + 50  # the Hermes tool prompt
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The README's round trip: the client's own message object sent back, then the tool's result.
    messages = [*ASK, first.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": '{"result": 5}'}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=20)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError, match="only an assistant message has them"):
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": "x", "tool_calls": turn[1]["tool_calls"]}])
    with pytest.raises(openai.BadRequestError, match="no tool named 'nope'"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=2,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_hermes_prompt_of_a_template_without_tools():
    tools = [Tool.model_validate(t) for t in TOOLS]
    messages = hermes_messages([{"role": "system", "content": "Be brief."}, *ASK], tools)
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in messages[0]["content"] and "<tool_call>" in messages[0]["content"]


def test_llama3_json_parser_and_the_auto_choice():
    text = '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}'
    content, calls = parse("llama3_json", text)
    assert content is None and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]
    stream = ToolCallStream("llama3_json")
    assert "".join(stream.push(text[i:i + 4]) for i in range(0, len(text), 4)) == ""
    rest, streamed = stream.finish()
    assert rest == "" and [c["function"]["arguments"] for c in streamed] == [c["function"]["arguments"] for c in calls]
    assert parse("llama3_json", "Hello {not a call}") == ("Hello {not a call}", [])
    assert parse("hermes", "<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])
    assert parser_for("auto", "{{ '<tool_call>' }}") == "hermes"
    assert parser_for("auto", "{{ '<|python_tag|>' }} ipython") == "llama3_json"
    assert parser_for("auto", None) == "hermes" and parser_for("llama3_json", "<tool_call>") == "llama3_json"
