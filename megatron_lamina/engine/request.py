"""A generation request as the driver tracks it from admission to its final token.

Tokens are one list, prompt then output; `num_computed` counts those whose K/V is in the
cache of the request's attention shard. The tokens still to feed are
`token_ids[num_computed:]`: the whole prompt (in chunks) at first, one token per decode
step after, the whole sequence again after a preemption (recompute).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from megatron_lamina.engine.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    user_id: object = None            # the caller's id for it (JSONL id, HTTP request id)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    shard: int = -1
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    text: str = ""
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    arrival_time: float = 0.0         # time.monotonic() when a server accepted it

    def __post_init__(self):
        if self.generator is None:
            self.generator = self.params.make_generator()

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
