"""Tool calling in chat requests: the tools' request fields, the prompt, and the forced calls' grammar.

`tools` (OpenAI's `{"type": "function", "function": {"name", "description", "parameters",
"strict"}}`) reach the model through the chat template, which renders them when it takes
a `tools` variable (LLaMA-3.1/3.2, Qwen2.5, Hermes). A template that does not (the default
model's) gets them as vLLM's and Qwen2.5's Hermes prompt in its system message, and the
conversation's earlier calls and results in the same format (`<tool_call>` in the assistant's
turn, `<tool_response>` in the tool's), so the model sees what the parser reads back.

`tool_choice`: `none` (the tools are shown, the output is plain text: vLLM's default), `auto` (the model
decides; `server/tool_parsers.py` reads calls from its output), `required` (the output is
constrained to a JSON array of one or more `{"name", "parameters"}` objects, each tool's
parameters under its schema: vLLM's format) and a named function (the output is
constrained to that function's parameters: its arguments). With `parallel_tool_calls:
false` a required answer holds one call. The forced grammars go through the same compile,
cache and mask as any JSON schema, so their arguments always validate.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import Field

from megatron_lamina.requests.prompt import PromptInput
from megatron_lamina.requests.request_schema import StrictModel
from megatron_lamina.requests.structured_output import StructuredOutput

HERMES_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


class FunctionDefinition(StrictModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parameters_schema(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def forced_output(tools: list[Tool], choice: ToolChoice, parallel: bool) -> StructuredOutput | None:
    """The constraint of a `required` or named tool choice (None for `auto` and `none`);
    ValueError names a tool whose parameters are not a schema the grammar engine takes."""
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        return StructuredOutput.json_schema(parameters_schema(tool))
    if choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                               "parameters": parameters_schema(t)},
              "required": ["name", "parameters"]} for t in tools]
    array = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        array["maxItems"] = 1
    return StructuredOutput.json_schema(array)


def forced_calls(output: str, tools: list[Tool], choice: ToolChoice) -> list[dict] | None:
    """The tool calls of a forced answer's whole output (None when it is not complete JSON:
    cut by max_tokens or a stop string)."""
    try:
        value = json.loads(output)
    except json.JSONDecodeError:
        return None
    if isinstance(choice, NamedToolChoice):
        return [tool_call(choice.function.name, value)]
    return [tool_call(call["name"], call["parameters"]) for call in value]


def tool_call(name: str, arguments: Any) -> dict:
    """OpenAI's tool call object; `arguments` a JSON value (written as JSON text) or its text."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def template_takes_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def hermes_messages(messages: list[dict], tools: list[Tool] | None) -> list[dict]:
    """The conversation for a template that does not render tools: the tools in the system
    message (Qwen2.5's Hermes prompt), earlier calls as `<tool_call>` text in the assistant's
    turns, tool results as `<tool_response>` text."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                           "arguments": c["function"]["arguments"]},
                                                          ensure_ascii=False) + "\n</tool_call>"
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).lstrip("\n")})
        elif m["role"] == "tool":
            out.append({"role": "tool", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        listed = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
        system = HERMES_SYSTEM.format(tools=listed)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def tools_prompt(codec, messages: list[dict], tools: list[Tool] | None) -> PromptInput:
    """The prompt of a chat with tools or earlier calls: the template renders them when it
    takes tools (token ids, tokenized here), else the Hermes prompt (`hermes_messages`).
    ValueError: the template refused the messages."""
    if template_takes_tools(codec.tokenizer.chat_template):
        listed = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        return PromptInput(prompt_token_ids=codec.encode_chat(messages, tools=listed))
    return PromptInput(messages=hermes_messages(messages, tools))
