"""The messages between the engine process (rank 0) and the HTTP front end process.

The server runs as two processes so that the HTTP side (uvicorn, JSON, one SSE event per
token and stream) never takes the engine's interpreter lock: rank 0 runs the engine loop
(`driver/engine_service.py`), a child process runs the front end (`server/frontend.py`),
and they talk over one `multiprocessing` pipe. Every message is a tuple whose first item
names it; its payloads are the plain dataclasses below (pickled by the pipe). A step's
outputs travel as tuples (`pack_output` / `unpack_output`): the engine pickles a step's
outputs on its loop, and tuples pickle many times faster than dataclasses (docs/BENCHMARKS.md).

Front end -> engine:
  ("add", [(key, PromptInput), ...])   requests the front end admitted (tokenized, checked);
                                        `key` is the front end's id for the request
  ("abort", key)                        its caller left: end it, free its blocks
  ("drain",)                            the front end was asked to stop (SIGTERM to it)
  ("draining",)                         the front end saw the engine's "draining" and refuses
                                        new requests from now on (every "add" before it is
                                        already in the pipe)
  ("reset_prefix_cache",)               an admin asked to forget every cached prefix
Engine -> front end:
  ("ready", EngineInfo)                 once, when the engine can serve
  ("step", [(key, packed RequestOutput), ...], StepReport | None)   one per step read back
                                        (the report is None for requests refused or failed)
  ("state", state, error)               "draining", "stopped" or "dead" (error: why)
  ("prefix_cache_reset", blocks)        the answer to "reset_prefix_cache": the blocks forgotten
  ("exit",)                             the engine is done: answer what is left, then exit
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields

from megatron_lamina.requests.output import RequestOutput
from megatron_lamina.requests.prompt import Capacity

pack_output = operator.attrgetter(*(f.name for f in fields(RequestOutput)))  # RequestOutput -> tuple


def unpack_output(packed: tuple) -> RequestOutput:
    return RequestOutput(*packed)


@dataclass(frozen=True)
class EngineInfo:
    """What the front end needs of the engine to check and admit requests."""

    capacity: Capacity
    vocab_size: int
    engine_pid: int


@dataclass
class StepStats:
    """One step as the metrics see it (server/metrics.py); `LLMEngine` keeps one per step read back."""

    rows: int                  # sampled rows (requests that got a token)
    tokens: int                # token rows computed (decode tokens and prefill chunks)
    wall_s: float              # host time from this step's launch to its tokens read back
    gpu_s: float | None = None         # the step's span on the GPU (CUDA)
    gpu_period_s: float | None = None  # GPU time since the previous step ended (back-to-back steps)


@dataclass
class StepReport:
    """The engine's side of one step, as the metrics show it (server/metrics.py)."""

    steps: list[StepStats] = field(default_factory=list)  # the steps read back since the last report
    running: int = 0
    waiting: int = 0
    blocks_total: int = 0
    blocks_used: list[int] = field(default_factory=list)  # per attention shard
    # The prefix cache's counters since start-up (block_manager.PrefixCacheStats.as_tuple:
    # queries, device hits and host hits in tokens; evictions, offloads and loads in blocks).
    prefix_cache: tuple[int, ...] = (0, 0, 0, 0, 0, 0)
