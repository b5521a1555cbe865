"""The layout search: simulate every candidate layout, rank by throughput per dollar under a
TPOT SLO (DESIGN.md section 8).

Candidates: for each model-worker device and TP size the cost tables cover (TP dividing the
KV heads, weights fitting, one machine holding the TP ranks), the colocated layout (one micro-batch: on one device more
micro-batches only shrink the GEMMs) and every disaggregated layout with 1..N attention
workers of each attention device type, head groups = gcd(attention workers, KV heads) (and
1, pure request shards, when that differs), 1..4 micro-batches, each KV cache dtype asked
for; total devices bounded.
Each such layout is simulated at saturation (simulator.py) with increasing batch caps; the
ladder stops at the first cap that breaks the SLO, or once the engine no longer fills the
cap (KV capacity or prefill budget bind, so larger caps change nothing).

A result is feasible when the TPOT percentile meets the SLO and the layout neither rejects
nor cuts short a request for lack of KV cache. Rank: feasible first, then output tokens per
dollar (output tokens/s x 3600 / price per hour).
"""

from __future__ import annotations

import math
import multiprocessing as mp
from dataclasses import dataclass, field, replace
from typing import Mapping

from megatron_lamina.planner.cost_table import CostTable
from megatron_lamina.planner.devices import DeviceSpec
from megatron_lamina.planner.layout import Layout, kv_blocks_per_cache
from megatron_lamina.planner.link import Link
from megatron_lamina.planner.shapes import ModelShape
from megatron_lamina.planner.simulator import SimResult, simulate
from megatron_lamina.planner.trace import TraceRequest


@dataclass(frozen=True)
class Slo:
    tpot_s: float
    percentile: int = 90   # 50, 90 or 99

    def met_by(self, result: SimResult) -> bool:
        value = result.tpot_s.get(f"p{self.percentile}")
        return value is not None and value <= self.tpot_s


@dataclass(frozen=True)
class SearchSpace:
    model_devices: tuple[str, ...] = ("H100",)
    attention_devices: tuple[str, ...] = ("H100", "H20", "H200")
    tp_sizes: tuple[int, ...] = (1, 2, 4, 8)
    attention_workers: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    micro_batches: tuple[int, ...] = (1, 2, 3, 4)
    batch_caps: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
    max_devices: int = 16
    max_prefill_tokens: int = 4096
    block_size: int = 16
    # The KV cache's dtypes to try (kv_cache.dtype): fp8_e4m3 holds twice the tokens per
    # cache and its attention reads half the bytes (cost_table.py).
    kv_cache_dtypes: tuple[str, ...] = ("auto",)
    # GPUs in one machine per model device: TP stays inside one machine (deployment.py);
    # a device not listed bounds nothing.
    gpus_per_node: Mapping[str, int] = field(default_factory=dict)


@dataclass
class Candidate:
    result: SimResult
    price_per_hour: float
    feasible: bool
    why_not: str          # empty when feasible
    synthetic: bool       # computed from at least one synthetic cost table

    @property
    def layout(self) -> Layout:
        return self.result.layout

    @property
    def tokens_per_dollar(self) -> float:
        return self.result.output_throughput * 3600 / self.price_per_hour

    def to_dict(self) -> dict:
        return {"label": self.layout.label, "hardware": self.layout.hardware, "ratio": self.layout.ratio,
                "price_per_hour": self.price_per_hour, "tokens_per_dollar": self.tokens_per_dollar,
                "feasible": self.feasible, "why_not": self.why_not, "synthetic": self.synthetic,
                **self.result.to_dict()}


def base_layouts(shape: ModelShape, tables: dict[str, CostTable], specs: dict[str, DeviceSpec],
                 space: SearchSpace) -> list[Layout]:
    """Every layout of the space with its smallest batch cap (the ladder raises it)."""
    kv = shape.num_kv_heads
    first_cap = space.batch_caps[0]
    out = []
    for model_device in space.model_devices:
        if model_device not in tables:
            continue
        for tp in space.tp_sizes:
            if (kv % tp or tp not in tables[model_device].tp_sizes() or tp > space.max_devices
                    or tp > space.gpus_per_node.get(model_device, tp)):
                continue
            out.append(Layout(model_device, tp, None, 0, 1, 1, first_cap, space.max_prefill_tokens,
                              space.block_size))
            for attention_device in space.attention_devices:
                if attention_device not in tables:
                    continue
                for workers in space.attention_workers:
                    if tp + workers > space.max_devices:
                        continue
                    for groups in sorted({math.gcd(workers, kv), 1}):
                        for n in space.micro_batches:
                            if n <= first_cap:
                                out.append(Layout(model_device, tp, attention_device, workers, groups, n,
                                                  first_cap, space.max_prefill_tokens, space.block_size))
    return [replace(lay, kv_cache_dtype=kv) for lay in out for kv in space.kv_cache_dtypes
            if lay.model_device in specs and (lay.colocated or lay.attention_device in specs)]


@dataclass
class _Job:
    layout: Layout
    shape: ModelShape
    tables: dict[str, CostTable]
    specs: dict[str, DeviceSpec]
    trace: list[TraceRequest]
    slo: Slo
    batch_caps: tuple[int, ...]
    max_model_len: int | None
    dtype_bytes: int
    decode_only: bool
    link: Link | None


def _ladder(job: _Job) -> list[Candidate]:
    """Simulate one layout at increasing batch caps (module docstring)."""
    blocks = kv_blocks_per_cache(job.layout, job.shape, job.specs, job.dtype_bytes)
    if blocks < 1:
        return []  # the weights do not fit on the model workers
    model = job.tables[job.layout.model_device]
    attention = model if job.layout.colocated else job.tables[job.layout.attention_device]
    out = []
    for cap in job.batch_caps:
        if cap < job.layout.micro_batches:
            continue
        layout = job.layout.with_batch(cap)
        result = simulate(job.trace, layout, job.shape, model, attention, blocks, job.max_model_len,
                          saturate=True, decode_only=job.decode_only, link=job.link)
        why_not = []
        if not job.slo.met_by(result):
            why_not.append(f"TPOT p{job.slo.percentile} {result.tpot_s.get(f'p{job.slo.percentile}') or 0:.4f}s "
                           f"> {job.slo.tpot_s:g}s")
        if result.rejected_kv or result.kv_capacity:
            why_not.append(f"KV cache too small for {result.rejected_kv + result.kv_capacity} requests")
        if not result.saturated:
            why_not.append("trace slice too short to saturate")
        out.append(Candidate(result, layout.price_per_hour(job.specs), not why_not, "; ".join(why_not),
                             model.synthetic or attention.synthetic))
        if why_not or result.max_batch < cap:
            break
    return out


def search(trace: list[TraceRequest], shape: ModelShape, tables: dict[str, CostTable],
           specs: dict[str, DeviceSpec], slo: Slo, space: SearchSpace = SearchSpace(),
           max_model_len: int | None = None, jobs: int = 1, decode_only: bool = False,
           link: Link | None = None) -> list[Candidate]:
    """Every evaluated (layout, batch cap), ranked: feasible first, then tokens per dollar.
    `link`: the model-attention network (None: each attention table's `network` curve)."""
    dtype_bytes = next(iter(tables.values())).dtype_bytes
    work = [_Job(lay, shape, tables, specs, trace, slo, space.batch_caps, max_model_len, dtype_bytes,
                 decode_only, link)
            for lay in base_layouts(shape, tables, specs, space)]
    if jobs > 1:
        with mp.get_context("fork").Pool(jobs) as pool:
            ladders = pool.map(_ladder, work, chunksize=1)
    else:
        ladders = [_ladder(job) for job in work]
    candidates = [c for ladder in ladders for c in ladder]
    return sorted(candidates, key=lambda c: (not c.feasible, -c.tokens_per_dollar))
