"""A generation request as the driver tracks it from admission to its final token.

Tokens are the prompt then the output; `num_computed` counts those whose K/V is in the
cache of the request's attention shard (or will be, once the planned steps have run: the
scheduler advances it when it plans a chunk). The tokens still to feed are those from
`num_computed` on: the whole prompt (in chunks) at first, one token per decode step after,
the whole sequence again after a preemption (recompute).

With asynchronous scheduling a token can be sampled on the device and not yet known on the
host: `num_pending` counts those (0, 1, or 2 for a moment between launching a step and
reading back the previous one), and `feed_row` is the row of the newest one in its step's
sampled tokens, which the next step's inputs take it from on the device.

With the prefix cache (block_manager.py) a request is admitted with `num_computed` at the
tokens its cached prefix already holds, and `num_cached_tokens` reports them.

The prompt is kept as a tuple: Python's garbage collector stops tracking a tuple of ints,
while it walks every item of a list on each full collection, and a thousand running
8K-token prompts made each of those a pause of milliseconds on the driver.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_lamina.requests.output import TokenLogprob
from megatron_lamina.requests.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # a request is itself: `in`/`remove` on the queues compare identities
class Request:
    request_id: int
    prompt_token_ids: tuple[int, ...]  # any sequence given; kept as a tuple (see above)
    params: SamplingParams
    user_id: object = None            # the caller's id for it (JSONL id, HTTP request id)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    shard: int = -1
    block_table: list[int] = field(default_factory=list)
    num_blocks_sent: int = 0          # how much of block_table the ranks already know
    num_computed: int = 0
    num_pending: int = 0              # sampled on the device, not yet appended (async scheduling)
    feed_row: int = -1                # row of the newest pending token in its step's sampled tokens
    text: str = ""
    stop_searched: int = 0            # text before this index was searched for stop strings
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # with params.logprobs
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # with params.prompt_logprobs
    finish_reason: str | None = None
    error: str | None = None          # why it failed, with finish_reason "error" (its own fault)
    generator: torch.Generator | None = None
    detokenizer: Any = None           # the engine's incremental detokenizer for this request
    arrival_time: float = 0.0         # time.monotonic() when a server accepted it
    grammar: Any = None               # with structured_outputs: its compile (a Future), then its GrammarState
    cache_salt: str | None = None     # only requests with the same salt share cached KV blocks
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks
    num_registered: int = 0           # blocks of block_table the prefix cache holds under their hash
    num_cached_tokens: int = -1       # tokens its first admission took from the prefix cache (-1: not yet)

    def __post_init__(self):
        self.prompt_token_ids = tuple(self.prompt_token_ids)
        if self.generator is None:
            self.generator = self.params.make_generator()

    @property
    def token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    def tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list (a decode step asks for one)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        if end <= n:
            return list(self.prompt_token_ids[start:end])
        return [*self.prompt_token_ids[start:], *self.output_token_ids[:end - n]]

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens its first admission took from the prefix cache (0 before it)."""
        return max(self.num_cached_tokens, 0)

    @property
    def num_tokens(self) -> int:
        """Tokens known on the host: the prompt and the output read back so far."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
