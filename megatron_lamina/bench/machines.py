"""Several machines on one host, for tests and benchmarks: Linux network namespaces joined by a bridge.

`Machines(n)` creates n network namespaces, each a "machine" with its own loopback and one
interface holding its own address (10.213.0.1, .2, ...), all joined by a bridge that lives in
a namespace of its own, so the host's own network is never touched and no traffic leaves
the namespaces. `run` starts a command inside machine i (`ip netns exec`); `cut` takes a
machine's cable out (its bridge port down: packets vanish without a reset, as when a
switch or a link dies); leaving the `with` block kills every process still inside and removes
the namespaces. Needs root and iproute2; `unavailable()` says why namespaces cannot be made
here (tests skip with that reason).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SUBNET = "10.213.0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why network namespaces cannot be created here, or None when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    name = f"lamprobe{os.getpid()}"
    probe = _ip("netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"`ip netns add` failed: {probe.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class Machines:
    _made = itertools.count()  # a process may make several sets, one after another

    def __init__(self, count: int):
        tag = f"{os.getpid() % 100000}{chr(ord('a') + next(self._made) % 26)}"
        self.count = count
        self.switch = f"lsw{tag}"
        self.names = [f"lm{tag}-{i}" for i in range(count)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(count)]

    def __enter__(self) -> "Machines":
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                _ip("netns", "add", name)
                # `ip netns exec` mounts /etc/netns/NAME/hosts over /etc/hosts: the host name
                # (shared: namespaces keep the host's) resolves to this machine's own address, as
                # on a real machine, and every address has a name, so no lookup waits on DNS.
                etc = Path("/etc/netns") / name
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.addresses[i]} {socket.gethostname()}\n" + "".join(
                    f"{address} machine{j}\n" for j, address in enumerate(self.addresses)))
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", f"port{i}",
                    "netns", self.switch)
                _ip("-n", self.switch, "link", "set", f"port{i}", "master", "br0")
                _ip("-n", self.switch, "link", "set", f"port{i}", "up")
                _ip("-n", name, "addr", "add", f"{self.addresses[i]}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def run(self, i: int, argv: list[str], **popen) -> subprocess.Popen:
        """Start `argv` on machine i (in its own session, so a signal to it reaches no other)."""
        return subprocess.Popen(["ip", "netns", "exec", self.names[i], *argv], start_new_session=True, **popen)

    def pids(self, i: int) -> list[int]:
        out = _ip("netns", "pids", self.names[i], check=False).stdout
        return [int(p) for p in out.split()]

    def cut(self, i: int) -> None:
        """Machine i's cable out: nothing reaches it or leaves it, and nobody is told."""
        _ip("-n", self.switch, "link", "set", f"port{i}", "down")

    def kill_all(self, i: int) -> None:
        for pid in self.pids(i):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __exit__(self, *exc) -> None:
        for i in range(self.count):
            self.kill_all(i)
        deadline = time.monotonic() + 10
        while any(self.pids(i) for i in range(self.count)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for name in [*self.names, self.switch]:
            _ip("netns", "del", name, check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
