"""Rank -> role, and who talks to whom (DESIGN.md section 2).

Ranks `0 .. TP-1` are model workers (rank 0 is also the driver); the remaining ranks are
attention workers laid out as a grid `head_groups x request_shards`, shard-major:
attention rank = TP + shard * head_groups + head_group. TP rank t owns KV heads
`[t*K/TP, (t+1)*K/TP)` (and their query heads), attention head group h owns
`[h*K/H, (h+1)*K/H)`; a `Route` connects a TP rank and an attention worker whose KV-head
ranges overlap, for one request shard, and carries the overlap. Both ends of the transport
iterate the same routes in the same order. Colocated (no attention workers): one shard,
served locally.

`init_process_groups` creates the tensor-parallel group over the model-worker ranks only
(handed to Megatron through a `ProcessGroupCollection`, so attention workers are in no
Megatron group), a gloo group over all ranks for the step plans, one for start-up agreements
(which may wait minutes for a model to load), and one gloo pair (rank 0 and one other rank) per
other rank for the driver's heartbeat (worker/control_plane.py): a pair of its own, so a beat
to a rank never waits behind another rank's step, as the plans' broadcast (a tree through the
ranks) does. The heartbeat, not the plans' group, bounds a rank's wait for its next plan, so
only the driver's end of `control` times out after `runtime.step_timeout_s`; the other ranks'
ends wait `PLAN_WAIT_TIMEOUT_S`. Disaggregated, it also
creates one group per direction of the transport (q/k/v to the attention workers, outputs
back to the model workers): each group has its own NCCL communicator and stream, so a
micro-batch's q/k/v can travel while an earlier micro-batch's output is still awaited (on a
single communicator NCCL runs point-to-point ops of a rank pair in issue order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class Route:
    peer: int    # the rank at the other end
    shard: int   # request shard whose rows travel on this route
    kv_lo: int   # global KV heads [kv_lo, kv_hi) exchanged (with their query heads)
    kv_hi: int


@dataclass(frozen=True)
class Topology:
    tp_size: int
    head_groups: int
    request_shards: int
    num_kv_heads: int
    attention_workers: int

    @classmethod
    def from_config(cls, cfg, num_kv_heads: int) -> "Topology":
        p = cfg.parallel
        return cls(p.tensor_parallel, p.attention_head_groups, cfg.request_shards, num_kv_heads,
                   p.attention_workers)

    @property
    def world_size(self) -> int:
        return self.tp_size + self.attention_workers

    @property
    def colocated(self) -> bool:
        return self.attention_workers == 0

    def is_model_worker(self, rank: int) -> bool:
        return rank < self.tp_size

    def attention_rank(self, head_group: int, shard: int) -> int:
        return self.tp_size + shard * self.head_groups + head_group

    def attention_coords(self, rank: int) -> tuple[int, int]:
        """(head_group, shard) of an attention-worker rank."""
        index = rank - self.tp_size
        return index % self.head_groups, index // self.head_groups

    def describe_rank(self, rank: int) -> str:
        """'model worker TP 0/2 (driver)', 'attention worker head group 0, shard 1', ..."""
        if self.is_model_worker(rank):
            return f"model worker TP {rank}/{self.tp_size}" + (" (driver)" if rank == 0 else "")
        group, shard = self.attention_coords(rank)
        return f"attention worker head group {group}/{self.head_groups}, shard {shard}/{self.request_shards}"

    def tp_kv_range(self, tp_rank: int) -> tuple[int, int]:
        per = self.num_kv_heads // self.tp_size
        return tp_rank * per, (tp_rank + 1) * per

    def group_kv_range(self, head_group: int) -> tuple[int, int]:
        per = self.num_kv_heads // self.head_groups
        return head_group * per, (head_group + 1) * per

    def routes_from_tp(self, tp_rank: int) -> list[Route]:
        lo, hi = self.tp_kv_range(tp_rank)
        routes = []
        for shard in range(self.request_shards):
            for group in range(self.head_groups):
                g_lo, g_hi = self.group_kv_range(group)
                if max(lo, g_lo) < min(hi, g_hi):
                    routes.append(Route(self.attention_rank(group, shard), shard,
                                        max(lo, g_lo), min(hi, g_hi)))
        return routes

    def routes_to_attention(self, rank: int) -> list[Route]:
        group, shard = self.attention_coords(rank)
        g_lo, g_hi = self.group_kv_range(group)
        routes = []
        for tp_rank in range(self.tp_size):
            lo, hi = self.tp_kv_range(tp_rank)
            if max(lo, g_lo) < min(hi, g_hi):
                routes.append(Route(tp_rank, shard, max(lo, g_lo), min(hi, g_hi)))
        return routes


@dataclass
class ProcessGroups:
    tp: dist.ProcessGroup | None   # model-worker ranks only (None on attention workers)
    control: dist.ProcessGroup     # every rank, gloo: step plans and shutdown (timeout: a step's on the
                                   # driver, PLAN_WAIT_TIMEOUT_S on the others)
    startup: dist.ProcessGroup     # every rank, gloo: start-up agreements (timeout: STARTUP_TIMEOUT_S)
    to_attention: dist.ProcessGroup | None = None  # every rank: q/k/v messages (None colocated)
    to_model: dist.ProcessGroup | None = None      # every rank: attention outputs
    # gloo pairs {other rank: [0, other rank]} for the heartbeat (timeout: a step's): the driver
    # holds every other rank's pair, another rank its own
    heartbeat: dict[int, dist.ProcessGroup] = field(default_factory=dict)


# Loading an 8B model and capturing its graphs (torch.compile included) takes minutes, while
# the other ranks wait in the KV-size agreement: start-up gets its own group and timeout.
STARTUP_TIMEOUT_S = 1800.0
# A non-driver rank waits for its next plan as long as the driver's heartbeat goes on (an idle
# server waits for requests for days), so its end of the plans' group has no timeout to speak of.
PLAN_WAIT_TIMEOUT_S = 10 * 365 * 86400.0


def init_process_groups(topology: Topology, rank: int, timeout_s: float) -> ProcessGroups:
    """Every rank calls this, in the same order (new_group is collective)."""
    timeout = timedelta(seconds=timeout_s)
    tp = dist.new_group(list(range(topology.tp_size)), timeout=timeout)
    everyone = list(range(topology.world_size))
    # A group's timeout is each rank's own: the driver's plan to a rank that stopped answering
    # fails after a step's timeout, while the others wait on their heartbeat.
    plan_wait = timeout if rank == 0 else timedelta(seconds=PLAN_WAIT_TIMEOUT_S)
    control = dist.new_group(everyone, backend="gloo", timeout=plan_wait)
    startup = dist.new_group(everyone, backend="gloo", timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
    groups = ProcessGroups(tp=tp if topology.is_model_worker(rank) else None, control=control, startup=startup)
    for other in everyone[1:]:
        pair = dist.new_group([0, other], backend="gloo", timeout=timeout)
        if rank in (0, other):
            groups.heartbeat[other] = pair
    if not topology.colocated:
        groups.to_attention = dist.new_group(everyone, timeout=timeout)
        groups.to_model = dist.new_group(everyone, timeout=timeout)
    return groups
