"""The driver's engine behind a server: a thread that steps, callers that await (rank 0 only).

`LLMEngine.step` blocks on collectives, so it runs on its own thread; HTTP handlers run on
asyncio. `AsyncEngine.generate` (`generate_all`: several, admitted together or not at all)
hands a request to the engine thread through an inbox and returns its `RequestOutput`
deltas. The thread posts a step's deltas of every request in one `call_soon_threadsafe` (not
one per request: each wakes the event loop), and a caller that falls behind gets the deltas
that piled up merged into one, so the HTTP side never makes the engine wait and never queues
more than one delta per request. A caller that stops iterating (a client that disconnected)
closes its outputs, which aborts its request and frees its blocks at the next step. When
idle the thread sends an empty plan every `heartbeat_s` seconds so that every rank's
collective timeout keeps measuring liveness.

States: `serving`; `draining` (SIGTERM: new requests refused, running ones finish; at the
drain deadline `fail_running` ends what is left with an error the callers still receive);
`stopped` (after `stop`: what was left is failed, the other ranks are released); `dead` (a
step raised: a rank died or timed out; every request is failed with an error, `/health`
reports it, and the launcher exits non-zero).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Protocol

from megatron_lamina.engine.llm_engine import LLMEngine, PromptInput
from megatron_lamina.engine.output import OutputTracker, RequestOutput
from megatron_lamina.engine.request import Request


class EngineUnavailable(Exception):
    """The engine takes no new request now (draining, dead, or the queue is full)."""


class EngineListener(Protocol):
    def on_step(self, engine: LLMEngine, outputs: list[tuple[Request, RequestOutput]], now: float) -> None: ...


class _Stream:
    """One request's deltas, handed from the engine thread to its caller on the event loop."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.tracker = OutputTracker(request)
        self.loop = loop
        self.pending: list[RequestOutput] = []  # event loop only
        self.ready = asyncio.Event()

    def deliver(self, output: RequestOutput) -> None:  # on the event loop
        self.pending.append(output)
        self.ready.set()

    async def next(self) -> RequestOutput:
        """The deltas posted since the last call, merged into one."""
        await self.ready.wait()
        outputs, self.pending = self.pending, []
        self.ready.clear()
        return merge_outputs(outputs)


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    last = outputs[-1]
    if len(outputs) == 1:
        return last
    logprobs = None if last.logprobs is None else [x for o in outputs for x in (o.logprobs or [])]
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return RequestOutput(last.request_id, "".join(o.text for o in outputs),
                         [t for o in outputs for t in o.token_ids], last.finished, last.finish_reason,
                         last.prompt_tokens, last.completion_tokens, last.error, logprobs, prompt_logprobs)


class RequestOutputs:
    """One admitted request's deltas, as an async iterator. A caller that stops before the
    last one calls `aclose` (also when it never started iterating): that aborts the request
    and frees its blocks at the next step."""

    def __init__(self, engine: "AsyncEngine", request: Request, stream: _Stream):
        self.engine, self.request, self.stream = engine, request, stream
        self.done = False  # released: finished, or closed

    def __aiter__(self) -> "RequestOutputs":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        output = await self.stream.next()
        if output.finished:
            self.done = True
            self.engine._release(self.request, finished=True)
        return output

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.engine._release(self.request, finished=False)


def _deliver_all(batch: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, output in batch:
        stream.deliver(output)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queued: int, heartbeat_s: float,
                 listener: EngineListener | None = None):
        self.engine, self.max_queued, self.heartbeat_s = engine, max_queued, heartbeat_s
        self.listener = listener
        self.state = "serving"
        self.error: str | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[int, _Stream] = {}  # engine thread only
        self._pending = 0                        # accepted and not finished (any thread)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.stopped = threading.Event()         # the engine thread has ended
        self._thread = threading.Thread(target=self._run, name="lamina-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- caller side (asyncio) -------------------------------------------------------
    def make_request(self, item: PromptInput) -> Request:
        """Tokenize and check that the request can ever run; ValueError names the problem."""
        request = self.engine.make_request(item)
        self.engine.scheduler.check_fits(request)
        return request

    def generate(self, request: Request) -> "RequestOutputs":
        """Admit the request now (EngineUnavailable if it cannot be) and return its outputs."""
        return self.generate_all([request])[0]

    def generate_all(self, requests: list[Request]) -> list["RequestOutputs"]:
        """Admit all the requests or none (EngineUnavailable): the choices of one HTTP request."""
        with self._lock:
            if self.state != "serving":
                raise EngineUnavailable(f"the server is {self.state}" + (f": {self.error}" if self.error else ""))
            if self._pending + len(requests) > self.max_queued:
                raise EngineUnavailable(f"too many requests in flight ({self._pending}, this one would add "
                                        f"{len(requests)}); retry later")
            self._pending += len(requests)
            outputs, now, loop = [], time.monotonic(), asyncio.get_running_loop()
            for request in requests:
                request.arrival_time = now
                stream = _Stream(request, loop)
                self._inbox.put(("add", request, stream))
                outputs.append(self._outputs(request, stream))
        return outputs

    def _outputs(self, request: Request, stream: _Stream) -> "RequestOutputs":
        return RequestOutputs(self, request, stream)

    def _release(self, request: Request, finished: bool) -> None:
        with self._lock:
            self._pending -= 1
        if not finished:
            self._inbox.put(("abort", request, None))

    def begin_drain(self) -> None:
        with self._lock:
            if self.state == "serving":
                self.state = "draining"

    def idle(self) -> bool:
        return self._pending == 0

    def fail_running(self, message: str) -> None:
        """End every request in flight with `message` (its caller gets an error, a stream its
        error event and [DONE]); the engine goes on running. The drain's deadline."""
        self._inbox.put(("fail", None, message))

    def stop(self) -> None:
        """Fail what is left, release the other ranks and end the engine thread."""
        self._stop.set()
        self._inbox.put(("wake", None, None))
        self.stopped.wait()

    # ---- engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        last_step, error = time.monotonic(), None
        try:
            while not self._stop.is_set():
                idle = not self.engine.has_work()
                if idle:
                    self.engine.went_idle()
                self._take_inbox(block=idle, last_step=last_step)
                if self.engine.has_work():
                    self._publish(self.engine.step())
                    last_step = time.monotonic()
                elif time.monotonic() - last_step >= self.heartbeat_s:
                    self.engine.heartbeat()
                    last_step = time.monotonic()
        except Exception as e:  # a rank died, timed out, or a bug: never leave a caller waiting
            error = f"{type(e).__name__}: {e}"
        with self._lock:  # from here on `generate` refuses, so nothing new reaches the inbox
            self.state, self.error = ("dead", error) if error else ("stopped", None)
        self._take_inbox(block=False, last_step=0.0)
        self._fail_all(f"the engine failed: {error}" if error else "the server is shutting down")
        if error is None:
            self.engine.shutdown()
        self.stopped.set()

    def _take_inbox(self, block: bool, last_step: float) -> None:
        timeout = max(0.0, self.heartbeat_s - (time.monotonic() - last_step))
        while True:
            try:
                kind, request, stream = self._inbox.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "fail":
                self._fail_all(stream)
            elif kind == "add":
                self._streams[request.request_id] = stream
                self.engine.scheduler.add(request)
            elif kind == "abort" and self._streams.pop(request.request_id, None) is not None:
                if not request.finished:
                    self.engine.scheduler.finish(request, "abort")

    def _publish(self, updated: list[Request]) -> None:
        now = time.monotonic()
        batch, outputs = [], []
        for request in updated:
            stream = self._streams.get(request.request_id)
            if stream is None:
                continue
            output = stream.tracker.next_output()
            batch.append((stream, output))
            outputs.append((request, output))
            if output.finished:
                del self._streams[request.request_id]
        self._post(batch)
        if self.listener is not None:
            self.listener.on_step(self.engine, outputs, now)

    def _post(self, batch: list[tuple[_Stream, RequestOutput]]) -> None:
        """One wake-up of each event loop for the whole batch."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, output in batch:
            by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver_all, items)

    def _fail_all(self, message: str) -> None:
        batch = []
        for request_id, stream in list(self._streams.items()):
            if not stream.tracker.request.finished:
                self.engine.scheduler.finish(stream.tracker.request, "error")
            batch.append((stream, stream.tracker.next_output(error=message)))
            del self._streams[request_id]
        self._post(batch)
