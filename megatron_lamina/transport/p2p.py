"""Disaggregated transport over `torch.distributed` point-to-point ops (gloo or NCCL).

Both ends follow the same `Route`s (topology.py): a model worker (TP rank t) sends, for
every request shard with rows in the micro-batch and every attention worker whose KV-head
group overlaps t's heads, one packed message `[rows, (q_heads + 2*kv_heads) * head_dim]`
with those rows' q, k and v of the overlapping heads, and receives `[rows, q_heads,
head_dim]` back. No metadata travels: both sides derive row ranges and head slices from the
step plan and the topology. Sends and receives are asynchronous (`isend`/`irecv`), posted in
plan order (layer-major, then micro-batch), which is identical on every rank. Each direction
goes through its own process group (`to_attention`, `to_model`; topology.py), so on NCCL the
two directions run on separate communicators and streams and do not queue behind each other.

`host_staging` is for GPU tensors over gloo (e.g. two ranks sharing one GPU, where NCCL
refuses to pair a device with itself): messages go through host memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_lamina.host_to_device import HostArrays
from megatron_lamina.plan import MicroBatch
from megatron_lamina.topology import Route


@dataclass
class PendingExchange:
    out: torch.Tensor
    works: list = field(default_factory=list)
    keep_alive: list = field(default_factory=list)  # send buffers must outlive their isend
    receives: list = field(default_factory=list)    # (row lo, row hi, q-head slice, buffer)


def _head_slices(route: Route, own_kv_lo: int, queries_per_kv: int) -> tuple[slice, slice]:
    kv = slice(route.kv_lo - own_kv_lo, route.kv_hi - own_kv_lo)
    return slice(kv.start * queries_per_kv, kv.stop * queries_per_kv), kv


class P2PChannel:
    """Model-worker end."""

    def __init__(self, routes: list[Route], own_kv_lo: int, queries_per_kv: int, host_staging: bool = False,
                 to_attention: dist.ProcessGroup | None = None, to_model: dist.ProcessGroup | None = None):
        self.routes, self.own_kv_lo, self.queries_per_kv = routes, own_kv_lo, queries_per_kv
        self.host_staging = host_staging
        self.to_attention, self.to_model = to_attention, to_model

    def prepare(self, mb: MicroBatch) -> HostArrays:
        """Nothing to copy: the routes' rows come from the plan (the context is the micro-batch)."""
        return HostArrays({}, lambda _: mb)

    def begin(self, layer, mb: MicroBatch, q, k, v) -> PendingExchange:
        pending = PendingExchange(out=torch.empty_like(q))
        for route in self.routes:
            lo, hi = mb.shard_rows(route.shard)
            if lo == hi:
                continue
            qs, kvs = _head_slices(route, self.own_kv_lo, self.queries_per_kv)
            packed = torch.cat(
                [q[lo:hi, qs].flatten(1), k[lo:hi, kvs].flatten(1), v[lo:hi, kvs].flatten(1)], dim=1
            )
            reply = torch.empty_like(q[lo:hi, qs], device="cpu" if self.host_staging else q.device)
            if self.host_staging:
                packed = packed.cpu()
            pending.works.append(dist.isend(packed, route.peer, group=self.to_attention))
            pending.works.append(dist.irecv(reply, route.peer, group=self.to_model))
            pending.keep_alive.append(packed)
            pending.receives.append((lo, hi, qs, reply))
        return pending

    def finish(self, pending: PendingExchange) -> torch.Tensor:
        for work in pending.works:
            work.wait()
        if len(pending.receives) == 1 and not self.host_staging:
            lo, hi, qs, reply = pending.receives[0]
            if reply.shape == pending.out.shape:  # one route carried every row and head
                return reply
        for lo, hi, qs, reply in pending.receives:
            pending.out[lo:hi, qs] = reply.to(pending.out.device)
        return pending.out


class AttentionEndpoint:
    """Attention-worker end: receive a micro-batch's q, k, v for one shard, send o back."""

    def __init__(self, routes: list[Route], shard: int, own_kv_lo: int, kv_heads: int,
                 queries_per_kv: int, head_dim: int, dtype: torch.dtype, device, host_staging: bool = False,
                 to_attention: dist.ProcessGroup | None = None, to_model: dist.ProcessGroup | None = None):
        self.routes, self.shard, self.own_kv_lo = routes, shard, own_kv_lo
        self.host_staging = host_staging
        self.to_attention, self.to_model = to_attention, to_model
        self.kv_heads, self.queries_per_kv, self.head_dim = kv_heads, queries_per_kv, head_dim
        self.dtype, self.device = dtype, device
        self.sends: list = []  # (work, buffer) of replies not yet known to be delivered

    def receive(self, mb: MicroBatch):
        lo, hi = mb.shard_rows(self.shard)
        n, d, g = hi - lo, self.head_dim, self.queries_per_kv
        buffers = []
        for route in self.routes:
            heads = route.kv_hi - route.kv_lo
            buf = torch.empty(n, (heads * g + 2 * heads) * d, dtype=self.dtype,
                              device="cpu" if self.host_staging else self.device)
            buffers.append((route, buf, dist.irecv(buf, route.peer, group=self.to_attention)))
        if len(buffers) == 1 and buffers[0][0].kv_hi - buffers[0][0].kv_lo == self.kv_heads and not self.host_staging:
            _, buf, work = buffers[0]  # one route with all this worker's heads: views, no copies
            work.wait()
            q, k, v = buf.split([self.kv_heads * g * d, self.kv_heads * d, self.kv_heads * d], dim=1)
            return q.view(n, -1, d), k.view(n, -1, d), v.view(n, -1, d)
        q = torch.empty(n, self.kv_heads * g, d, dtype=self.dtype, device=self.device)
        k = torch.empty(n, self.kv_heads, d, dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        for route, buf, work in buffers:
            work.wait()
            buf = buf.to(self.device)
            qs, kvs = _head_slices(route, self.own_kv_lo, g)
            heads = kvs.stop - kvs.start
            q_part, k_part, v_part = buf.split([heads * g * d, heads * d, heads * d], dim=1)
            q[:, qs] = q_part.view(n, -1, d)
            k[:, kvs] = k_part.view(n, -1, d)
            v[:, kvs] = v_part.view(n, -1, d)
        return q, k, v

    def reply(self, o: torch.Tensor) -> None:
        for route in self.routes:
            qs, _ = _head_slices(route, self.own_kv_lo, self.queries_per_kv)
            buf = o[:, qs].contiguous()
            if self.host_staging:
                buf = buf.cpu()
            self.sends.append((dist.isend(buf, route.peer, group=self.to_model), buf))

    def drain(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()
