"""Placement: which process of which machine takes which rank, whatever order the machines joined in.

torch elastic's c10d rendezvous numbers the machines in the order their agents joined (it
ignores `--node-rank`), so the ranks it hands out say nothing about where a process runs. Every
rank therefore starts by declaring its seat (`Seat`: the node rank it was started with, its
local rank, its host, address and device) in the job's store, reads every other rank's, checks
them against `deployment.nodes` (each node rank present once, with as many ranks as its entry
says) and takes its *placed* rank: seats sorted by (node, local rank). Node 0 is the model
node, so ranks `0..TP-1` are its model workers, rank 0 the driver, and the attention workers
follow node by node; topology.py maps placed ranks to roles exactly as on one machine. The
default process group is then created over the same store with the placed ranks, so nothing
after this module knows that the machines joined in another order.

On one machine this is the identity (seats sort as torch numbered them). Gloo chooses its
network interface from the host name, which on a machine with several interfaces (or in a
network namespace) may not be the one the other machines reach: unless GLOO_SOCKET_IFNAME is
set, every rank of a multi-machine job sets it to the interface of its own address, the one
it reaches the store through.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

SEAT_TIMEOUT_S = 600.0  # every rank of every machine declares its seat right after the rendezvous


class PlacementError(ValueError):
    """The machines' declarations do not fit the config; str() is one line."""


@dataclass(frozen=True)
class Seat:
    node: int           # the node rank this machine was started with (--node-rank)
    local_rank: int     # this process's index on its machine (its device)
    host: str           # the machine's host name
    address: str        # the machine's address, as the others reach it
    device: str         # device name, e.g. "NVIDIA H100 80GB HBM3" or "cpu"
    memory_gib: float   # the device's memory (host memory for cpu)
    launched_rank: int  # the rank torch elastic gave this process (join order)


@dataclass(frozen=True)
class Placement:
    rank: int                  # this process's placed rank
    seats: tuple[Seat, ...]    # every rank's seat, indexed by placed rank

    def node_of(self, rank: int) -> int:
        return self.seats[rank].node


def node_address(peer_host: str) -> str:
    """This machine's address on the route to `peer_host` (a UDP socket connected, nothing sent)."""
    if peer_host in ("localhost", "") or peer_host.startswith("127."):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((socket.gethostbyname(peer_host), 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds IPv4 `address`, if any."""
    SIOCGIFADDR = 0x8915  # <linux/sockios.h>
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    return None


def local_device(device: str, local_rank: int) -> tuple[str, float]:
    """(name, memory in GiB) of the device this local rank uses."""
    if device == "cuda" and torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(index)
        return props.name, props.total_memory / 2**30
    return "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def seats_order(seats: list[Seat], cfg) -> list[int]:
    """Check every declared seat against `cfg.deployment` and return the launched ranks in
    placed order: by (node, local rank). PlacementError names the first thing that is wrong."""
    nnodes = cfg.nnodes
    for seat in seats:
        if not 0 <= seat.node < nnodes:
            raise PlacementError(
                f"{seat.host} ({seat.address}) was started as node rank {seat.node}, but the config's "
                f"deployment.nodes has {nnodes} node(s) (ranks 0..{nnodes - 1})")
    for node in range(nnodes):
        mine = [s for s in seats if s.node == node]
        hosts = sorted({f"{s.host} ({s.address})" for s in mine})
        if len(hosts) > 1:
            raise PlacementError(f"node rank {node} was declared by {len(hosts)} machines ({', '.join(hosts)}); "
                                 f"start each machine with its own --node-rank")
        want = cfg.node_workers(node)
        if len(mine) != want and cfg.deployment.nodes:  # one machine: validate_layout says it with the fix
            raise PlacementError(f"node rank {node} ({', '.join(hosts) or 'no machine'}) runs {len(mine)} "
                                 f"rank(s) but deployment.nodes[{node}].workers = {want}")
    order = sorted(range(len(seats)), key=lambda i: (seats[i].node, seats[i].local_rank))
    return [seats[i].launched_rank for i in order]


def join_job(cfg, node_rank: int) -> Placement:
    """Every rank, first thing under a launcher: declare this process's seat, agree on the
    placed ranks and create the default process group with them."""
    launched, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    address = node_address(master)
    if cfg.nnodes > 1 and "GLOO_SOCKET_IFNAME" not in os.environ:
        interface = interface_of(address)
        if interface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
    name, memory = local_device(cfg.runtime.device, local_rank)
    seat = Seat(node_rank, local_rank, socket.gethostname(), address, name, round(memory, 1), launched)
    store, _, _ = next(dist.rendezvous("env://", launched, world, timeout=timedelta(seconds=SEAT_TIMEOUT_S)))
    store = dist.PrefixStore("lamina/placement", store)
    store.set(f"seat/{launched}", json.dumps(asdict(seat)))
    seats = [Seat(**json.loads(store.get(f"seat/{r}"))) for r in range(world)]
    order = seats_order(seats, cfg)
    rank = order.index(launched)
    dist.init_process_group(backend=cfg.process_group_backend, store=dist.PrefixStore("lamina/job", store), rank=rank,
                            world_size=world, timeout=timedelta(seconds=cfg.runtime.step_timeout_s))
    return Placement(rank, tuple(seats[r] for r in order))


def placement_lines(placement: Placement, role_of) -> list[str]:
    """One start-up line per rank: node, host and address, device, role, rank."""
    lines = []
    for rank, seat in enumerate(placement.seats):
        lines.append(f"rank {rank}: node {seat.node}, host {seat.host} {seat.address}, device {seat.device} "
                     f"({seat.memory_gib:g} GiB), {role_of(rank)}")
    return lines
