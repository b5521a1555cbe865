"""The engine loop of a server's rank 0: requests from the front end in, one message per step out.

`EngineService.run` is rank 0's main loop while it serves: it takes what the HTTP front end
sent (`requests/engine_link.py`: requests admitted, requests whose callers left, drain) between
steps, runs `LLMEngine.step`, and sends the front end each step's output deltas (one
`OutputTracker` per request: text held back at a possible stop string or a split character)
with a `StepReport` for the metrics, as one message. Nothing else runs in this process, so
no HTTP work ever waits for the engine's interpreter lock or delays its steps. Nor does the
engine ever wait on the front end: its messages go through a bounded queue to a sender
thread (vLLM's engine core has the same output thread). While the queue is full (a front end
that stalls) the loop takes no step, since tokens nobody reads would only pile up, but it
keeps reading the pipe, and the driver's heartbeat keeps the other ranks alive meanwhile
(worker/control_plane.py); stepping resumes once the front end reads again, nothing lost.
Each turn, idle or not, the loop asks whether a rank stopped answering that heartbeat.
A request that fails on its own (`LLMEngine.fail_request`) gets an error delta; the others go on.

States: `serving`; `draining` (SIGTERM to rank 0, or to the front end: the front end refuses
new requests, running ones finish; at `drain_timeout_s` what is left is failed with an error
its caller still receives); `stopped` (drained: the other ranks are released, exit 0);
`dead` (a step raised: a rank died or timed out; every request gets an error, exit 1). A
front end that exits is an error too: the other ranks are released, exit 1.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

from megatron_lamina.requests.engine_link import EngineInfo, StepReport, pack_output
from megatron_lamina.driver.llm_engine import LLMEngine
from megatron_lamina.driver.output_tracker import OutputTracker
from megatron_lamina.requests.output import error_output
from megatron_lamina.driver.request import Request

IDLE_POLL_S = 0.1  # how often an idle loop looks at the drain flag a signal handler sets
FRONT_END_GRACE_S = 10.0  # after the drain's deadline, how long a silent front end is waited for
# Messages the engine may be ahead of the front end before it stops stepping: enough that a
# front end's pause (a garbage collection, a burst of connections) never stops the engine,
# few enough that one that stalls holds little memory.
OUTBOX_MESSAGES = 256


class FrontEndGone(Exception):
    """The front end's end of the pipe closed: it exited or was killed."""


class EngineService:
    def __init__(self, engine: LLMEngine, conn: Connection, drain_timeout_s: float):
        self.engine, self.conn = engine, conn
        self.drain_timeout_s = drain_timeout_s
        self.state, self.error = "serving", None
        self._trackers: dict[int, OutputTracker] = {}  # front-end key -> the request's deltas
        self._keys: dict[int, int] = {}                 # engine request id -> front-end key
        self._drain_asked = False      # set by a signal handler or the front end
        self._front_draining = False   # the front end acknowledged: no "add" comes after
        self._deadline: float | None = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # bounded by the loop: see OUTBOX_MESSAGES
        self._send_error: OSError | None = None  # the sender thread's: the front end is gone
        self._sender = threading.Thread(target=self._send_forever, name="lamina-frontend-send", daemon=True)

    def begin_drain(self) -> None:
        """Safe from a signal handler: the loop starts the drain at its next turn."""
        self._drain_asked = True

    def run(self) -> int:
        """Serve until drained (0), or until a rank or the front end failed (1)."""
        engine = self.engine
        front_alive = True
        self._sender.start()
        try:
            self._send(("ready", EngineInfo(engine.scheduler.capacity, engine.ctx.arch.vocab_size, os.getpid())))
            while not self._drained():
                engine.control.check()  # a rank that died or hangs ends the job, busy or idle
                self._check_drain()
                blocked = self._outbox.qsize() >= OUTBOX_MESSAGES  # the front end is not reading: do not step
                idle = blocked or not engine.has_work()
                if idle:
                    engine.went_idle()
                self._take_messages(IDLE_POLL_S if idle else 0.0)
                if not blocked and engine.has_work():
                    self._publish(engine.step())
        except FrontEndGone:
            front_alive, self.error = False, "the HTTP front end exited"
        except Exception as e:  # a rank died, timed out, or a bug: never leave a caller waiting
            self.error = f"{type(e).__name__}: {e}"
        dead = self.error is not None and front_alive
        self.state = "dead" if dead else "stopped"
        self._fail_all(f"the engine failed: {self.error}" if dead else "the server is shutting down", front_alive)
        if front_alive:
            self._quiet_send(("state", self.state, self.error))
            self._quiet_send(("exit",))
        self._outbox.put(None)  # the sender's last message
        self._sender.join(timeout=FRONT_END_GRACE_S)  # a front end that stopped reading is not waited for
        if dead:
            engine.abandon()
        else:
            engine.shutdown()  # the other ranks are fine: release them
        return 1 if self.error else 0

    # ---- drain -----------------------------------------------------------------------
    def _check_drain(self) -> None:
        if self._drain_asked and self.state == "serving":
            self.state, self._deadline = "draining", time.monotonic() + self.drain_timeout_s
            self._send(("state", "draining", None))
        if self._deadline is not None and time.monotonic() >= self._deadline and self._trackers:
            self._fail_all(f"the server is shutting down: requests still running after server.drain_timeout_s = "
                           f"{self.drain_timeout_s:g} s were stopped", True)

    def _drained(self) -> bool:
        if self._deadline is not None and time.monotonic() > self._deadline + FRONT_END_GRACE_S:
            return True  # a front end that never acknowledged the drain is not waited for forever
        return self._front_draining and not self._trackers and not self.engine.has_work()

    # ---- the pipe --------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        """Queue a message for the front end; never waits."""
        if self._send_error is not None:
            raise FrontEndGone() from self._send_error
        self._outbox.put(message)

    def _quiet_send(self, message: tuple) -> None:
        """Queue a message on the way out, whether or not the front end is still there."""
        self._outbox.put(message)

    def _send_forever(self) -> None:
        while (message := self._outbox.get()) is not None:
            if self._send_error is not None:
                continue  # drain the queue, so that the main thread's put never waits
            try:
                self.conn.send(message)
            except OSError as e:  # BrokenPipeError, ConnectionResetError: the main loop raises FrontEndGone
                self._send_error = e
            except Exception:  # a bug (a message that does not pickle): say so, keep the pipe going
                traceback.print_exc(file=sys.stderr)

    def _take_messages(self, wait: float) -> None:
        if self._send_error is not None:
            raise FrontEndGone() from self._send_error
        try:
            while self.conn.poll(wait):
                wait = 0.0
                self._handle(self.conn.recv())
        except (EOFError, OSError) as e:
            raise FrontEndGone() from e

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            self._add(message[1])
        elif kind == "abort":
            tracker = self._trackers.pop(message[1], None)
            if tracker is not None:
                self._keys.pop(tracker.request.request_id, None)
                if not tracker.request.finished:
                    self.engine.scheduler.finish(tracker.request, "abort")
        elif kind == "drain":
            self._drain_asked = True
        elif kind == "draining":
            self._front_draining = True
        elif kind == "reset_prefix_cache":
            self._send(("prefix_cache_reset", self.engine.scheduler.blocks.reset_prefix_cache()))

    def _add(self, items: list) -> None:
        now, refused = time.monotonic(), []
        for key, item in items:
            try:
                request = self.engine.make_request(item)
                self.engine.admit(request)  # checks it fits, as the front end did
            except ValueError as e:
                refused.append((key, str(e)))
                continue
            except Exception as e:  # noqa: BLE001 - a fault of ours with this request: it fails alone
                print("error: admitting a request failed; the others go on:", file=sys.stderr)
                traceback.print_exception(e, file=sys.stderr)
                refused.append((key, f"internal error while admitting this request ({type(e).__name__}: {e})"))
                continue
            request.arrival_time = now
            self._trackers[key] = OutputTracker(request)
            self._keys[request.request_id] = key
        if refused:
            self._send(("step", [(key, pack_output(error_output(message))) for key, message in refused], None))

    # ---- outputs ---------------------------------------------------------------------
    def _publish(self, updated: list[Request]) -> None:
        outputs = []
        for request in updated:
            key = self._keys.get(request.request_id)
            if key is None:
                continue
            output = self._trackers[key].next_output()
            outputs.append((key, pack_output(output)))
            if output.finished:
                del self._trackers[key], self._keys[request.request_id]
        report = self._report()
        if outputs or report.steps:
            self._send(("step", outputs, report))

    def _report(self) -> StepReport:
        engine, scheduler = self.engine, self.engine.scheduler
        steps = []
        while engine.stats:
            steps.append(engine.stats.popleft())
        blocks = scheduler.blocks
        return StepReport(steps, len(scheduler.running), len(scheduler.waiting), blocks.num_blocks,
                          [blocks.num_blocks - blocks.num_free(s) for s in range(len(blocks.pools))],
                          blocks.stats.as_tuple())

    def _fail_all(self, message: str, tell: bool) -> None:
        outputs = []
        for key, tracker in list(self._trackers.items()):
            if not tracker.request.finished:
                self.engine.scheduler.finish(tracker.request, "error")
            outputs.append((key, pack_output(tracker.next_output(error=message))))
        self._trackers.clear()
        self._keys.clear()
        if tell and outputs:
            self._quiet_send(("step", outputs, None))
