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

`q_first` (runtime.q_first, set alike at both ends by the worker factory): each exchange
sends two messages per route instead, q rows `[rows, q_heads * head_dim]` of every route
first, then k, v packed `[rows, 2*kv_heads * head_dim]`, so that q arrives while k, v still
travel; the attention worker takes them with `receive_q` then `receive_kv` and attends the
cached tokens in between (worker/attention_worker.py, attention/lse_merge.py).

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


@dataclass
class PostedReceives:
    """One message per route, posted (attention end): `parts` are its tensors' heads per KV
    head of the route, e.g. (queries_per_kv, 1, 1) for packed q, k, v; (1, 1) for k, v."""

    rows: int
    parts: tuple[int, ...]
    messages: list  # (route, buffer, work) in route order


def _head_slices(route: Route, own_kv_lo: int, queries_per_kv: int) -> tuple[slice, slice]:
    kv = slice(route.kv_lo - own_kv_lo, route.kv_hi - own_kv_lo)
    return slice(kv.start * queries_per_kv, kv.stop * queries_per_kv), kv


class P2PChannel:
    """Model-worker end."""

    def __init__(self, routes: list[Route], own_kv_lo: int, queries_per_kv: int, host_staging: bool = False,
                 to_attention: dist.ProcessGroup | None = None, to_model: dist.ProcessGroup | None = None,
                 q_first: bool = False):
        self.routes, self.own_kv_lo, self.queries_per_kv = routes, own_kv_lo, queries_per_kv
        self.host_staging, self.q_first = host_staging, q_first
        self.to_attention, self.to_model = to_attention, to_model

    def prepare(self, mb: MicroBatch) -> HostArrays:
        """Nothing to copy: the routes' rows come from the plan (the context is the micro-batch)."""
        return HostArrays({}, lambda _: mb)

    def begin(self, layer, mb: MicroBatch, q, k, v) -> PendingExchange:
        pending = PendingExchange(out=torch.empty_like(q))
        posted = []  # (route, row lo, row hi, q-head slice, messages) of each route with rows
        for route in self.routes:
            lo, hi = mb.shard_rows(route.shard)
            if lo == hi:
                continue
            qs, kvs = _head_slices(route, self.own_kv_lo, self.queries_per_kv)
            q_rows = q[lo:hi, qs].flatten(1)
            kv_rows = [k[lo:hi, kvs].flatten(1), v[lo:hi, kvs].flatten(1)]
            messages = [q_rows.contiguous(), torch.cat(kv_rows, dim=1)] if self.q_first else \
                [torch.cat([q_rows, *kv_rows], dim=1)]
            if self.host_staging:
                messages = [m.cpu() for m in messages]
            posted.append((route, lo, hi, qs, messages))
        # q-first: every route's q leaves before any k, v (per route: q, then k, v).
        for i in range(2 if self.q_first else 1):
            for route, _, _, _, messages in posted:
                pending.works.append(dist.isend(messages[i], route.peer, group=self.to_attention))
                pending.keep_alive.append(messages[i])
        for route, lo, hi, qs, _ in posted:
            reply = torch.empty_like(q[lo:hi, qs], device="cpu" if self.host_staging else q.device)
            pending.works.append(dist.irecv(reply, route.peer, group=self.to_model))
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
                 to_attention: dist.ProcessGroup | None = None, to_model: dist.ProcessGroup | None = None,
                 q_first: bool = False):
        self.routes, self.shard, self.own_kv_lo = routes, shard, own_kv_lo
        self.host_staging, self.q_first = host_staging, q_first
        self.to_attention, self.to_model = to_attention, to_model
        self.kv_heads, self.queries_per_kv, self.head_dim = kv_heads, queries_per_kv, head_dim
        self.dtype, self.device = dtype, device
        self.sends: list = []  # (work, buffer) of replies not yet known to be delivered

    def receive(self, mb: MicroBatch):
        """q, k, v of the micro-batch's rows on this shard: one packed message per route."""
        assert not self.q_first, "q-first: receive_q, then receive_kv"
        lo, hi = mb.shard_rows(self.shard)
        q, k, v = self._wait(self._post(hi - lo, (self.queries_per_kv, 1, 1)))
        return q, k, v

    def receive_q(self, mb: MicroBatch) -> tuple[torch.Tensor, PostedReceives]:
        """q-first: post the q and the k, v receives of every route (in the model side's
        order), wait for q only. Returns q and the k, v receives, for `receive_kv`."""
        assert self.q_first
        lo, hi = mb.shard_rows(self.shard)
        posted_q = self._post(hi - lo, (self.queries_per_kv,))
        posted_kv = self._post(hi - lo, (1, 1))
        [q] = self._wait(posted_q)
        return q, posted_kv

    def receive_kv(self, posted: PostedReceives) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._wait(posted)
        return k, v

    def _post(self, rows: int, parts: tuple[int, ...]) -> PostedReceives:
        messages = []
        for route in self.routes:
            width = (route.kv_hi - route.kv_lo) * sum(parts) * self.head_dim
            buf = torch.empty(rows, width, dtype=self.dtype, device="cpu" if self.host_staging else self.device)
            messages.append((route, buf, dist.irecv(buf, route.peer, group=self.to_attention)))
        return PostedReceives(rows, parts, messages)

    def _wait(self, posted: PostedReceives) -> list[torch.Tensor]:
        """The messages' parts ([rows, heads, head_dim] each) over this worker's heads."""
        n, d, parts = posted.rows, self.head_dim, posted.parts
        route, buf, work = posted.messages[0]
        if len(posted.messages) == 1 and route.kv_hi - route.kv_lo == self.kv_heads and not self.host_staging:
            work.wait()  # one route with all this worker's heads: views, no copies
            return [t.view(n, -1, d) for t in buf.split([self.kv_heads * m * d for m in parts], dim=1)]
        out = [torch.empty(n, self.kv_heads * m, d, dtype=self.dtype, device=self.device) for m in parts]
        for route, buf, work in posted.messages:
            work.wait()
            heads, lo = route.kv_hi - route.kv_lo, route.kv_lo - self.own_kv_lo
            for whole, m, t in zip(out, parts, buf.to(self.device).split([heads * m * d for m in parts], dim=1)):
                whole[:, lo * m:(lo + heads) * m] = t.view(n, -1, d)
        return out

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
