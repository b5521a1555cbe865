"""The engine as the HTTP front end sees it: admission, each request's deltas, the engine's state.

`EngineClient` lives on the front end's event loop (server/frontend.py). It tokenizes and
checks prompts (`prompt_ids`, against the engine's `Capacity`, in a worker thread), admits the
choices of one HTTP request together or not at all (`generate_all`: at most
`server.max_queued_requests` in flight), and sends them to the engine process as one "add"
(requests/engine_link.py). The pipe is used by two threads of its own, both blocking: one
sends what the event loop queued (the event loop never waits on the pipe), one reads the
engine's messages and hands each to the event loop (one wake-up per step), which delivers a
step's deltas to each request's `RequestOutputs`; a caller that fell behind gets its deltas
merged into one. (Not `loop.add_reader`: libuv makes the descriptor non-blocking, and a send
that meets a full pipe then fails instead of waiting.) A caller that stops iterating closes
its outputs, which sends "abort": the engine ends the request and frees its blocks.

`state` is what `/health` and `/ready` report: `loading` until the engine's "ready" (the
client exists, and HTTP answers, while the model loads; no request is admitted), then
`serving`, and the engine's "state" messages (draining, stopped, dead). "exit", or the pipe
closing, sets `exited` once every request still open got its last delta (an error when the
engine could not finish it). The stall watchdog (`check_progress`, every second and at each
probe) lives here because the timestamps do: a request admitted and not finished waits for
the engine, and a "step" message is the engine's progress; waiting `stall_timeout_s` with no
step makes `stall` say so (one `error:` line on stderr per stall) until the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection

from megatron_lamina.requests.engine_link import EngineInfo, StepReport, unpack_output
from megatron_lamina.requests.output import RequestOutput, error_output, merge_outputs
from megatron_lamina.requests.prompt import Capacity, PromptInput, prompt_ids
from megatron_lamina.requests.tokenizer import TextCodec
from megatron_lamina.server.metrics import ServerMetrics

WATCH_S = 1.0  # how often the stall watchdog looks, between probes


class EngineUnavailable(Exception):
    """The engine takes no new request now (loading, draining, dead, or too many in flight)."""


class _Stream:
    """One request's deltas, on the event loop."""

    def __init__(self, arrival: float):
        self.arrival = arrival
        self.pending: list[RequestOutput] = []
        self.ready = asyncio.Event()
        self.finished = False  # its last delta was delivered

    def deliver(self, output: RequestOutput) -> None:
        self.pending.append(output)
        self.finished = output.finished
        self.ready.set()

    async def next(self) -> RequestOutput:
        await self.ready.wait()
        outputs, self.pending = self.pending, []
        self.ready.clear()
        return merge_outputs(outputs)


class RequestOutputs:
    """One admitted request's deltas, as an async iterator. A caller that stops before the
    last one calls `aclose` (also when it never started iterating): the request is aborted."""

    def __init__(self, client: "EngineClient", key: int, stream: _Stream):
        self.client, self.key, self.stream = client, key, stream
        self.done = False

    def __aiter__(self) -> "RequestOutputs":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        output = await self.stream.next()
        if output.finished:
            self.done = True
            self.client._release(self.key, finished=True)
        return output

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.client._release(self.key, finished=False)


class EngineClient:
    def __init__(self, conn: Connection, codec: TextCodec, max_queued: int, metrics: ServerMetrics,
                 stall_timeout_s: float, on_ready: Callable[[EngineInfo], None] | None = None):
        self.conn, self.codec, self.max_queued, self.metrics = conn, codec, max_queued, metrics
        self.stall_timeout_s, self.on_ready = stall_timeout_s, on_ready
        self.vocab_size: int | None = None   # the engine's, from its "ready"
        self.capacity: Capacity | None = None
        self.state, self.error = "loading", None
        self.stall: str | None = None  # why the engine counts as stalled (the watchdog), else None
        self._last_step = time.monotonic()  # the engine's last progress: its last "step" message
        self._streams: dict[int, _Stream] = {}  # admitted and not released by their caller
        self._keys = itertools.count()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._resets: list[asyncio.Future] = []  # "reset_prefix_cache" asked, not answered yet (in order)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: asyncio.TimerHandle | None = None
        self.exited: asyncio.Event | None = None

    # ---- life ------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the pipe's reader and sender threads and the stall watchdog; the engine's
        messages are handled on `loop`."""
        self._loop, self.exited = loop, asyncio.Event()
        threading.Thread(target=self._send_forever, name="lamina-engine-send", daemon=True).start()
        threading.Thread(target=self._read_forever, name="lamina-engine-read", daemon=True).start()
        self._watch_now()

    def detach(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._outbox.put(None)

    def ask_drain(self) -> None:
        """Ask the engine to drain (safe from a signal handler)."""
        self._outbox.put(("drain",))

    def idle(self) -> bool:
        return not self._streams

    # ---- liveness --------------------------------------------------------------------
    def check_progress(self, now: float) -> None:
        """The stall watchdog: `stall` says why when requests wait (admitted, not finished) and
        the engine sent no step for `stall_timeout_s`, counted from its last step or from the
        oldest such request's arrival, whichever is later (an idle engine sends no steps)."""
        waiting = [stream.arrival for stream in self._streams.values() if not stream.finished]
        waited = now - max(self._last_step, min(waiting)) if waiting else 0.0
        if waited < self.stall_timeout_s:
            self.stall = None
            return
        first = self.stall is None
        self.stall = f"no engine progress for {waited:.0f} s with {len(waiting)} requests pending"
        if first:  # one line per stall
            print(f"error: {self.stall} (server.stall_timeout_s = {self.stall_timeout_s:g}); /health answers 503 "
                  f"until it resumes", file=sys.stderr, flush=True)

    def _watch_now(self) -> None:
        self.check_progress(time.monotonic())
        self._watch = self._loop.call_later(WATCH_S, self._watch_now)

    @property
    def max_model_len(self) -> int:
        """The longest sequence one request can reach: the model's context, or what one
        attention shard's KV cache holds when that is less (what /v1/models reports)."""
        cap = self.capacity
        return min(cap.max_model_len, cap.num_blocks * cap.block_size)

    # ---- callers ---------------------------------------------------------------------
    def prompt_ids(self, item: PromptInput) -> list[int]:
        """Tokenize and check that the prompt can ever run; ValueError names the problem."""
        ids = prompt_ids(self.codec, item, self.vocab_size)
        self.capacity.check(len(ids))
        return ids

    def generate_all(self, items: list[PromptInput]) -> list[RequestOutputs]:
        """Admit all the requests or none (EngineUnavailable): the choices of one HTTP request."""
        if self.state != "serving":
            raise EngineUnavailable(f"the server is {self.state}" + (f": {self.error}" if self.error else ""))
        if len(self._streams) + len(items) > self.max_queued:
            raise EngineUnavailable(f"too many requests in flight ({len(self._streams)}, this one would add "
                                    f"{len(items)}); retry later")
        now, added, outputs = time.monotonic(), [], []
        for item in items:
            key, stream = next(self._keys), _Stream(now)
            self._streams[key] = stream
            added.append((key, item))
            outputs.append(RequestOutputs(self, key, stream))
        self._outbox.put(("add", added))
        return outputs

    async def reset_prefix_cache(self) -> int:
        """Ask the engine to forget every cached prefix; the number of blocks it forgot."""
        if self.state != "serving":
            raise EngineUnavailable(f"the server is {self.state}" + (f": {self.error}" if self.error else ""))
        answer = self._loop.create_future()
        self._resets.append(answer)
        self._outbox.put(("reset_prefix_cache",))
        return await answer

    def _release(self, key: int, finished: bool) -> None:
        self._streams.pop(key, None)
        if not finished:
            self.metrics.forget(key)
            self._outbox.put(("abort", key))

    # ---- the pipe --------------------------------------------------------------------
    def _send_forever(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self.conn.send(message)
            except OSError:  # the engine is gone; the reader sees the pipe close
                return
            except Exception:  # a bug (a message that does not pickle): say so, keep the pipe going
                traceback.print_exc()

    def _read_forever(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                message = None
            try:
                self._loop.call_soon_threadsafe(self._handle if message else self._engine_gone, message)
            except RuntimeError:  # the event loop is closed: the front end is exiting
                return
            if message is None:
                return

    def _engine_gone(self, _=None) -> None:
        if self.state not in ("stopped", "dead"):
            self.state, self.error = "dead", "the engine process exited"
        self._finish("the engine process exited")

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":
            self._progress(time.monotonic())
            self._deliver(message[1], message[2])
        elif kind == "ready":
            self._ready(message[1])
        elif kind == "state":
            self.state, self.error = message[1], message[2]
            if self.state == "draining":
                self._outbox.put(("draining",))  # after every "add" already sent
        elif kind == "prefix_cache_reset":
            self._resets.pop(0).set_result(message[1])
        elif kind == "exit":
            self._finish("the server is shutting down")

    def _ready(self, info: EngineInfo) -> None:
        self.vocab_size, self.capacity, self.state = info.vocab_size, info.capacity, "serving"
        if self.on_ready is not None:
            self.on_ready(info)

    def _progress(self, now: float) -> None:
        if self.stall is not None:
            print(f"engine progress resumed after {now - self._last_step:.0f} s", file=sys.stderr, flush=True)
            self.stall = None
        self._last_step = now

    def _deliver(self, outputs: list[tuple[int, tuple]], report: StepReport | None) -> None:
        now, seen = time.monotonic(), []
        for key, packed in outputs:
            stream = self._streams.get(key)
            if stream is None:  # its caller left
                continue
            output = unpack_output(packed)
            stream.deliver(output)
            seen.append((key, stream.arrival, output))
        self.metrics.on_step(report, seen, now)

    def _finish(self, message: str) -> None:
        """The engine is done: every request still open ends (with an error) and `exited` is set."""
        for stream in self._streams.values():
            if not stream.finished:
                stream.deliver(error_output(message))
        for answer in self._resets:
            answer.set_exception(EngineUnavailable(message))
        self._resets.clear()
        self.exited.set()
