"""The choices of one completion or chat request: made, admitted together, run side by side.

A body with P prompts and `n` samples per prompt becomes P x n engine requests; choice
`index = prompt_index * n + sample_index` (OpenAI's order). Each prompt is tokenized once;
its samples share the token ids and differ in their sampling settings (sample i seeded
`seed + i` when the body has a seed, `_OpenAIFields.sample_params`; the engine makes each
one's generator). `admit` checks every choice
before any runs and admits them all or none (`EngineClient.generate_all`); `merged` runs their
outputs side by side and yields `(index, delta)` as they come, and closes every choice when
its consumer stops early (a client gone: each request is aborted, its blocks freed).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.concurrency import run_in_threadpool

from megatron_lamina.requests.output import RequestOutput
from megatron_lamina.requests.prompt import PromptInput
from megatron_lamina.requests.request_schema import RequestError, check_max_tokens, check_token_ids
from megatron_lamina.server.engine_client import EngineClient, EngineUnavailable, RequestOutputs
from megatron_lamina.server.grammar_check import GrammarCheck
from megatron_lamina.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from megatron_lamina.server.tool_calls import tools_prompt


@dataclass
class Choice:
    index: int
    prompt_index: int
    item: PromptInput        # token ids, sampling settings, the caller's id: what the engine runs
    echo: str | None = None  # completions with echo: the prompt's text, returned before the output

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.item.prompt_token_ids


async def make_choices(engine: EngineClient, body: CompletionRequest | ChatCompletionRequest, request_id: str,
                       max_model_len: int, grammars: GrammarCheck) -> list[Choice]:
    """Tokenize and check every prompt, then build its `n` samples; a mistake is a 400 naming
    the field (and, with several prompts, which one). An output constraint (a schema, a forced
    tool call) is compiled first (`grammars`): one that cannot be is a 400 too."""
    chat = isinstance(body, ChatCompletionRequest)
    field = "messages" if chat else "prompt"
    try:
        constraint = body.constraint()
    except RequestError as e:
        raise ApiError.invalid(e) from None
    if constraint is not None:
        await grammars.check(*constraint, engine.vocab_size)
    items = body.prompt_inputs()
    if chat and (body.tools or any(m.role == "tool" or m.tool_calls for m in body.messages)):
        try:
            items = [await run_in_threadpool(tools_prompt, engine.codec, [m.plain() for m in body.messages],
                                             body.tools)]
        except ValueError as e:  # the chat template refused the messages
            raise ApiError(400, str(e), field) from None
    if len(items) * body.n > engine.max_queued:  # could never be admitted: say so before tokenizing
        raise ApiError(400, f"{len(items)} prompts x n = {body.n} are {len(items) * body.n} choices, more than the "
                            f"server holds at once (server.max_queued_requests = {engine.max_queued})", field)
    logprobs, prompt_logprobs = body.logprob_counts()
    choices: list[Choice] = []
    for p, item in enumerate(items):
        which = f"prompt {p}: " if len(items) > 1 else ""
        try:
            if item.prompt_token_ids is not None:  # checked in microseconds: no thread hop
                ids = engine.prompt_ids(item)
            else:  # the tokenizer: off the event loop
                ids = await run_in_threadpool(engine.prompt_ids, item)
            max_tokens = body.default_max_tokens(len(ids), max_model_len)
            check_max_tokens(max_tokens, len(ids), max_model_len)
            params = body.sampling_params(max_tokens, logprobs, prompt_logprobs)
            check_token_ids(params, engine.vocab_size)
        except RequestError as e:
            raise ApiError(400, which + e.message, e.param) from None
        except ValueError as e:  # the tokenizer's or the capacity's: the prompt cannot run
            raise ApiError(400, which + str(e), field) from None
        echo = None
        if not chat and body.echo:  # the prompt as given, or its token ids' text
            echo = item.prompt if item.prompt is not None else engine.codec.tokenizer.decode(ids)
        for sample_params in body.sample_params(params):
            run = PromptInput(prompt_token_ids=ids, params=sample_params, user_id=f"{request_id}-{len(choices)}",
                              cache_salt=body.cache_salt)
            choices.append(Choice(len(choices), p, run, echo))
    return choices


def admit(engine: EngineClient, choices: list[Choice]) -> list[RequestOutputs]:
    try:
        return engine.generate_all([c.item for c in choices])
    except EngineUnavailable as e:
        raise ApiError(503, str(e), None, type="server_error") from e


async def merged(outputs: list[RequestOutputs]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, delta) of every choice as the deltas come, until every choice finished.
    One choice (the usual request) is iterated directly: one task wake-up per delta, not two
    (a pump task and a queue), which is per streamed token on the HTTP side."""
    if len(outputs) == 1:
        try:
            async for delta in outputs[0]:
                yield 0, delta
        finally:
            await outputs[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, deltas: RequestOutputs) -> None:
        try:
            async for delta in deltas:
                queue.put_nowait((index, delta))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, o)) for i, o in enumerate(outputs)]
    try:
        live = len(tasks)
        while live:
            index, delta = await queue.get()
            if delta is None:
                live -= 1
            else:
                yield index, delta
    finally:
        for task in tasks:
            task.cancel()
        for deltas in outputs:
            await deltas.aclose()
