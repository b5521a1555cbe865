"""The engine as the HTTP front end sees it: admission, each request's deltas, the engine's state.

`EngineClient` lives on the front end's event loop (server/frontend.py). It tokenizes and
checks prompts (`prompt_ids`, against the engine's `Capacity`, in a worker thread), admits the
choices of one HTTP request together or not at all (`generate_all`: at most
`server.max_queued_requests` in flight), and sends them to the engine process as one "add"
(engine/engine_link.py). The pipe is used by two threads of its own, both blocking: one
sends what the event loop queued (the event loop never waits on the pipe), one reads the
engine's messages and hands each to the event loop (one wake-up per step), which delivers a
step's deltas to each request's `RequestOutputs`; a caller that fell behind gets its deltas
merged into one. (Not `loop.add_reader`: libuv makes the descriptor non-blocking, and a send
that meets a full pipe then fails instead of waiting.) A caller that stops iterating closes
its outputs, which sends "abort": the engine ends the request and frees its blocks. The engine's
"state" messages set `state` (serving, draining, stopped, dead: what `/health` reports);
"exit", or the pipe closing, sets `exited` once every request still open got its last
delta (an error when the engine could not finish it).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
import traceback
from multiprocessing.connection import Connection

from megatron_lamina.engine.engine_link import EngineInfo, StepReport, unpack_output
from megatron_lamina.engine.output import RequestOutput, error_output, merge_outputs
from megatron_lamina.engine.prompt import PromptInput, prompt_ids
from megatron_lamina.engine.tokenizer import TextCodec
from megatron_lamina.server.metrics import ServerMetrics

class EngineUnavailable(Exception):
    """The engine takes no new request now (draining, dead, or too many in flight)."""


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
    def __init__(self, conn: Connection, info: EngineInfo, codec: TextCodec, max_queued: int,
                 metrics: ServerMetrics):
        self.conn, self.codec = conn, codec
        self.vocab_size, self.capacity, self.max_queued = info.vocab_size, info.capacity, max_queued
        self.metrics = metrics
        self.state, self.error = "serving", None
        self._streams: dict[int, _Stream] = {}  # admitted and not released by their caller
        self._keys = itertools.count()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exited: asyncio.Event | None = None

    # ---- life ------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the pipe's reader and sender threads; the engine's messages are handled on `loop`."""
        self._loop, self.exited = loop, asyncio.Event()
        threading.Thread(target=self._send_forever, name="lamina-engine-send", daemon=True).start()
        threading.Thread(target=self._read_forever, name="lamina-engine-read", daemon=True).start()

    def detach(self) -> None:
        self._outbox.put(None)

    def ask_drain(self) -> None:
        """Ask the engine to drain (safe from a signal handler)."""
        self._outbox.put(("drain",))

    def idle(self) -> bool:
        return not self._streams

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
            self._deliver(message[1], message[2])
        elif kind == "state":
            self.state, self.error = message[1], message[2]
            if self.state == "draining":
                self._outbox.put(("draining",))  # after every "add" already sent
        elif kind == "exit":
            self._finish("the server is shutting down")

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
        self.exited.set()
