"""The answer to a completion or chat request: one JSON body, or Server-Sent Events.

Both are built from the same pieces: `ChoiceWriter.piece` turns a choice's delta (a
`RequestOutput`) into its OpenAI choice object; a streamed choice gets one piece per delta
(chunks of several choices interleave, each tagged with its index), a non-streamed choice one
piece of all its deltas merged. With echo the first piece of a choice starts with the
prompt's text (and, with logprobs, the prompt tokens' log-probabilities, the first null).
Usage counts each prompt once and every choice's generated tokens. A choice the engine fails
makes the whole answer a 503 (or, streaming, an error event, then `data: [DONE]`). A chat
answer with tools carries `message.tool_calls` (read by `server/tool_parsers.py` under
`tool_choice: auto`, from the constrained JSON of a forced call) and `finish_reason:
"tool_calls"`; streamed, each call comes as OpenAI sends it: its id and name, then its arguments.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

from megatron_lamina.requests.output import RequestOutput, merge_outputs
from megatron_lamina.requests.tokenizer import TextCodec
from megatron_lamina.server.choices import Choice, merged
from megatron_lamina.server.logprob_format import chat_logprobs, completion_logprobs
from megatron_lamina.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from megatron_lamina.server.tool_calls import call_id, forced_calls
from megatron_lamina.server.tool_parsers import ToolCallStream, parse


@dataclass
class _ChoiceState:
    started: bool = False
    text_offset: int = 0  # characters of the choice's text its logprobs' tokens covered so far
    text: str = ""        # a streamed forced (required) tool call's output, held to its end
    tools: ToolCallStream | None = None  # a streamed auto tool choice's parser


class ChoiceWriter:
    """`tool_parser`: the parser of `tool_choice: auto` (server/tool_parsers.py)."""

    def __init__(self, body: CompletionRequest | ChatCompletionRequest, choices: list[Choice], codec: TextCodec,
                 tool_parser: str = "hermes"):
        self.body, self.choices, self.codec = body, choices, codec
        self.chat = isinstance(body, ChatCompletionRequest)
        self.tool_mode, self.tool_parser = body.tool_mode if self.chat else None, tool_parser
        self.states = [_ChoiceState(tools=ToolCallStream(tool_parser) if self.tool_mode == "auto" else None)
                       for _ in choices]

    def piece(self, index: int, out: RequestOutput, stream: bool) -> dict:
        choice, state = self.choices[index], self.states[index]
        first, state.started = not state.started, True
        piece: dict = {"index": index}
        called = False
        if self.chat:
            if stream:
                piece["delta"] = {"content": out.text} if out.text else {}
            else:
                piece["message"] = self._message(out.text)
                called = "tool_calls" in piece["message"]
            piece["logprobs"] = ({"content": chat_logprobs(self.codec, out.token_ids, out.logprobs or [])}
                                 if self.body.logprobs else None)
        else:
            piece["text"] = (choice.echo if first and choice.echo is not None else "") + out.text
            piece["logprobs"] = self._completion_logprobs(choice, state, out) if self.body.logprobs is not None \
                else None
        piece["finish_reason"] = _finish_reason(out, called)
        if self.body.return_token_ids:
            piece["token_ids"] = out.token_ids
        return piece

    def _message(self, text: str) -> dict:
        """A whole chat answer: its content, or the tool calls read from it."""
        content, calls = text, []
        if self.tool_mode == "auto":
            content, calls = parse(self.tool_parser, text)
        elif self.tool_mode in ("required", "named"):
            calls = forced_calls(text, self.body.tools, self.body.tool_choice) or []
            content = None if calls else text  # cut short (max_tokens, a stop string): the text as it is
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return message

    def stream_pieces(self, index: int, out: RequestOutput) -> list[dict]:
        """A streamed delta's choice objects: one, or (tool calls) one per OpenAI delta: a call's
        id and name first, then its argument fragments."""
        if not self.chat or self.tool_mode is None:
            return [self.piece(index, out, stream=True)]
        state, deltas, called = self.states[index], [], False
        if self.tool_mode == "named":
            if not state.started:
                name = self.body.tool_choice.function.name
                deltas.append(_call_delta(0, {"id": call_id(), "type": "function",
                                              "function": {"name": name, "arguments": ""}}))
            if out.text:
                deltas.append(_call_delta(0, {"function": {"arguments": out.text}}))
            called = True
        else:
            content, calls = "", []
            if self.tool_mode == "auto":
                content = state.tools.push(out.text)
                if out.finished:
                    rest, calls = state.tools.finish()
                    content += rest
            else:  # required: the calls are parsed from the whole output
                state.text += out.text
                if out.finished:
                    calls = forced_calls(state.text, self.body.tools, self.body.tool_choice) or []
                    content = "" if calls else state.text
            if content:
                deltas.append({"content": content})
            for i, call in enumerate(calls):
                deltas.append(_call_delta(i, {"id": call["id"], "type": "function",
                                              "function": {"name": call["function"]["name"], "arguments": ""}}))
                deltas.append(_call_delta(i, {"function": {"arguments": call["function"]["arguments"]}}))
            called = bool(calls)
        state.started = True
        pieces = [{"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas or [{}]]
        if self.body.logprobs:
            pieces[0]["logprobs"] = {"content": chat_logprobs(self.codec, out.token_ids, out.logprobs or [])}
        pieces[-1]["finish_reason"] = _finish_reason(out, called)
        if self.body.return_token_ids:
            pieces[0]["token_ids"] = out.token_ids
        return pieces

    def _completion_logprobs(self, choice: Choice, state: _ChoiceState, out: RequestOutput) -> dict:
        token_ids, entries = [], []
        if choice.echo is not None and out.prompt_logprobs is not None:
            prompt = choice.prompt_token_ids
            token_ids += prompt
            entries += out.prompt_logprobs
        token_ids += out.token_ids
        entries += out.logprobs or []
        logprobs, state.text_offset = completion_logprobs(self.codec, token_ids, entries, state.text_offset)
        return logprobs

    def usage(self, lasts: list[RequestOutput | None]) -> dict:
        counted = [(c, last) for c, last in zip(self.choices, lasts) if c.index % self.body.n == 0]
        prompt = sum(len(c.prompt_token_ids) for c, _ in counted)
        cached = sum(last.cached_tokens for _, last in counted if last is not None)  # of the prompts counted
        completion = sum(last.completion_tokens for last in lasts if last is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


def _call_delta(index: int, call: dict) -> dict:
    return {"tool_calls": [{"index": index, **call}]}


def _finish_reason(out: RequestOutput, called: bool) -> str | None:
    """A request that ended by itself after calling tools ends with "tool_calls" (OpenAI's)."""
    if not out.finished:
        return None
    return "tool_calls" if called and out.finish_reason == "stop" else out.finish_reason


async def collect(writer: ChoiceWriter, outputs) -> tuple[list[dict], dict[str, int]]:
    """Run every choice to its end: (choice objects by index, usage); ApiError 503 when the
    engine failed one."""
    deltas: list[list[RequestOutput]] = [[] for _ in writer.choices]
    async with aclosing(merged(outputs)) as events:
        async for index, out in events:
            if out.error is not None:
                raise ApiError(503, out.error, None, type="server_error")
            deltas[index].append(out)
    whole = [merge_outputs(d) for d in deltas]
    return [writer.piece(i, out, stream=False) for i, out in enumerate(whole)], writer.usage(whole)


async def respond_json(writer: ChoiceWriter, outputs, is_disconnected, header: dict) -> dict | None:
    """The whole body, or None when the client left first (every choice is then aborted)."""
    task = asyncio.create_task(collect(writer, outputs))
    while not task.done():  # a non-streaming client that leaves cancels its request
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await is_disconnected():
            task.cancel()
            return None
    choices, usage = task.result()
    return {**header, "choices": choices, "usage": usage}


async def sse_events(writer: ChoiceWriter, outputs, header: dict, include_usage: bool,
                     on_usage) -> AsyncIterator[str]:
    """`data: {chunk}` events as the choices' deltas come, then `data: [DONE]`. The header's
    JSON is written once per answer (the same text `json.dumps` of the whole chunk gives)."""
    opening = f"data: {json.dumps(header, ensure_ascii=False)[:-1]}, "  # the header's keys, open

    def event(choices, **extra) -> str:
        body = json.dumps({"choices": choices, **extra}, ensure_ascii=False)
        return f"{opening}{body[1:]}\n\n"

    if writer.chat:
        for choice in writer.choices:
            yield event([{"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
    lasts: list[RequestOutput | None] = [None] * len(writer.choices)
    failed = False
    async with aclosing(merged(outputs)) as deltas:
        async for index, out in deltas:
            if out.error is not None:
                yield f"data: {json.dumps(ApiError(503, out.error, None, type='server_error').body())}\n\n"
                failed = True
                break
            lasts[index] = out
            for piece in writer.stream_pieces(index, out):
                yield event([piece])
    if not failed:
        usage = writer.usage(lasts)
        on_usage(usage)
        if include_usage:
            yield event([], usage=usage)
    yield "data: [DONE]\n\n"
