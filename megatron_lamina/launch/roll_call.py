"""Which machines of a job joined, and which one was lost: each launcher's presence in the rendezvous store.

torch elastic's c10d rendezvous tells a machine that the job did not assemble in time, or that
its own ranks failed, but not which *other* machine is to blame. So each `lamina` launcher of
a multi-machine job keeps a roll call in the same TCPStore the rendezvous uses (served by node 0's
launcher at `--rdzv-endpoint`): a background thread writes this node's entry once (its
name and address), then adds 1 to its beat counter every `BEAT_S` and reads every
other node's. From that:
  * `missing()`: node ranks that never wrote their entry: after `--rdzv-timeout`, the launcher
    names them in its one `error:` line;
  * `lost()`: nodes whose counter stopped (their launcher was killed, or their network cut)
    and that did not say they left: when the ranks fail, the launcher names the lost node in
    its last line and exit status. A store that stopped answering means node 0, which
    serves it, was lost (or this one was cut off).
A launcher about to exit writes `left`, so a machine that ends normally is never reported lost.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from datetime import timedelta

BEAT_S = 1.0
STALL_S = 3.0  # a counter unchanged this long: its launcher is gone


class RollCall:
    def __init__(self, host: str, port: int, run_id: str, nnodes: int, node: int, entry: dict):
        self.host, self.port, self.nnodes, self.node = host, port, nnodes, node
        self.prefix = f"lamina/{run_id}/roll"
        self.entry = entry
        self.entries: dict[int, dict] = {}     # node -> its entry, once seen
        self._beats: dict[int, tuple[int, float]] = {}  # node -> (counter, when it last changed)
        self._left: set[int] = set()
        self.last_contact: float | None = None  # when the store last answered
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._said = False
        self._thread = threading.Thread(target=self._run, name="lamina-roll-call", daemon=True)

    def start(self) -> "RollCall":
        self._thread.start()
        return self

    # ---- what it knows -----------------------------------------------------------------
    def missing(self) -> list[int]:
        with self._lock:
            return [n for n in range(self.nnodes) if n not in self.entries]

    def lost(self) -> list[int]:
        """Other nodes that were seen, did not leave, and whose beats stopped."""
        now = time.monotonic()
        with self._lock:
            return [n for n, (_, changed) in sorted(self._beats.items())
                    if n != self.node and n not in self._left and now - changed > STALL_S]

    def store_silent(self) -> bool:
        return self.silent_for() > STALL_S

    def silent_for(self) -> float:
        """Seconds since the store last answered (since this roll call started, if never)."""
        return time.monotonic() - (self.last_contact or self.started)

    def verdict(self, wait_s: float = STALL_S + 2 * BEAT_S) -> tuple[list[int], bool]:
        """After a failure: (nodes lost, whether the store itself went silent), waiting up to
        `wait_s` for a stopped counter to become conclusive."""
        deadline = time.monotonic() + wait_s
        while True:
            lost, silent = self.lost(), self.store_silent()
            if lost or silent or time.monotonic() >= deadline:
                return lost, silent
            time.sleep(BEAT_S / 4)

    def say(self, line: str) -> None:
        """The launcher's verdict, printed once: the rendezvous deadline, torch's own error and a
        lost store can each reach it, from two threads."""
        with self._lock:
            if self._said:
                return
            self._said = True
        print(line, file=sys.stderr, flush=True)

    def wait_others(self, timeout_s: float) -> list[int]:
        """Node 0, before its store goes: wait until every other machine left or was lost, for
        `timeout_s` at most; the machines still there then."""
        deadline = time.monotonic() + timeout_s
        try:
            store = self._connect(timeout_s=BEAT_S)
            while True:
                self._read(store)
                gone = set(self._left) | set(self.lost()) | {self.node}
                staying = [n for n in sorted(self.entries) if n not in gone]
                if not staying or time.monotonic() >= deadline:
                    return staying
                time.sleep(BEAT_S / 4)
        except Exception:  # the store itself is gone: nobody is left to wait for
            return []

    def leave(self, reason: str) -> None:
        """Say this node ends by itself (never reported lost), and stop beating."""
        self._stop.set()
        self._thread.join(timeout=2 * BEAT_S)
        try:
            if self._answers():
                self._connect(timeout_s=BEAT_S).set(f"{self.prefix}/left/{self.node}", reason)
        except Exception:
            pass

    # ---- the thread --------------------------------------------------------------------
    def _connect(self, timeout_s: float):
        from torch.distributed import TCPStore

        return TCPStore(self.host, self.port, is_master=False, timeout=timedelta(seconds=timeout_s),
                        wait_for_workers=False)

    def _answers(self) -> bool:
        """Something listens at the endpoint (a plain connect, closed at once)."""
        try:
            socket.create_connection((self.host, self.port), timeout=BEAT_S).close()
            return True
        except OSError:
            return False

    def _run(self) -> None:
        store = None
        while not self._stop.is_set():
            try:
                if store is None:
                    if not self._answers():
                        raise ConnectionError  # torch's own client logs every failed attempt
                    store = self._connect(timeout_s=2 * BEAT_S)
                    store.set(f"{self.prefix}/entry/{self.node}", json.dumps(self.entry))
                store.add(f"{self.prefix}/beat/{self.node}", 1)
                self._read(store)
            except Exception:  # not up yet, or gone: try again next beat
                store = None
            self._stop.wait(BEAT_S)

    def _read(self, store) -> None:
        now = time.monotonic()
        for n in range(self.nnodes):
            key = f"{self.prefix}/entry/{n}"
            if n not in self.entries and store.check([key]):
                with self._lock:
                    self.entries[n] = json.loads(store.get(key))
            if n in self.entries:
                count = store.add(f"{self.prefix}/beat/{n}", 0)
                if store.check([f"{self.prefix}/left/{n}"]):
                    with self._lock:
                        self._left.add(n)
                with self._lock:
                    before = self._beats.get(n)
                    if before is None or before[0] != count:
                        self._beats[n] = (count, now)
        self.last_contact = now
