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

With the prefix cache (`PrefixCache`, the engine's `kv_cache.prefix_caching` and
`host_cache_gib`) every layout is simulated with it: hits come from the trace's `hash_ids`,
and the capacity is the layout's own, its KV pool (the blocks of every cache: each request
shard's, one block id across a head group's workers, or the colocated TP ranks') plus the
host tier of every rank that holds KV. So a layout with more attention workers shows its
larger cache in its throughput, and in its cost.

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
from megatron_lamina.planner.layout import Layout, host_blocks_per_cache, kv_blocks_per_cache
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


@dataclass(frozen=True)
class PrefixCache:
    """The engine's prefix cache as the planner prices it: `kv_cache.host_cache_gib` GiB of
    host tier on each rank that holds KV (0: the device cache alone)."""
    host_cache_gib: float = 0.0


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


@dataclass(frozen=True)
class Pricing:
    """What every candidate is priced with: the trace, the model, the devices' costs and
    prices, the SLO and the engine's settings the search does not vary."""
    trace: list[TraceRequest]
    shape: ModelShape
    tables: dict[str, CostTable]
    specs: dict[str, DeviceSpec]
    slo: Slo
    max_model_len: int | None = None
    decode_only: bool = False
    link: Link | None = None
    prefix: PrefixCache | None = None

    def candidate(self, layout: Layout) -> Candidate | None:
        """`layout` simulated at saturation; None when the weights do not fit its model workers."""
        dtype_bytes = next(iter(self.tables.values())).dtype_bytes
        blocks = kv_blocks_per_cache(layout, self.shape, self.specs, dtype_bytes)
        if blocks < 1:
            return None
        model = self.tables[layout.model_device]
        attention = model if layout.colocated else self.tables[layout.attention_device]
        host = 0 if self.prefix is None else host_blocks_per_cache(layout, self.shape, self.prefix.host_cache_gib,
                                                                    dtype_bytes)
        result = simulate(self.trace, layout, self.shape, model, attention, blocks, self.max_model_len,
                          saturate=True, decode_only=self.decode_only, link=self.link,
                          prefix_caching=self.prefix is not None, host_blocks=host)
        slo, why_not = self.slo, []
        if not slo.met_by(result):
            why_not.append(f"TPOT p{slo.percentile} {result.tpot_s.get(f'p{slo.percentile}') or 0:.4f}s "
                           f"> {slo.tpot_s:g}s")
        if result.rejected_kv or result.kv_capacity:
            why_not.append(f"KV cache too small for {result.rejected_kv + result.kv_capacity} requests")
        if not result.saturated:
            why_not.append("trace slice too short to saturate")
        return Candidate(result, layout.price_per_hour(self.specs), not why_not, "; ".join(why_not),
                         model.synthetic or attention.synthetic)


def _ladder(pricing: Pricing, layout: Layout, batch_caps: tuple[int, ...]) -> list[Candidate]:
    """Simulate one layout at increasing batch caps (module docstring)."""
    out = []
    for cap in batch_caps:
        if cap < layout.micro_batches:
            continue
        candidate = pricing.candidate(layout.with_batch(cap))
        if candidate is None:
            return []  # the weights do not fit on the model workers
        out.append(candidate)
        if not candidate.feasible or candidate.result.max_batch < cap:
            break
    return out


def search(trace: list[TraceRequest], shape: ModelShape, tables: dict[str, CostTable],
           specs: dict[str, DeviceSpec], slo: Slo, space: SearchSpace = SearchSpace(),
           max_model_len: int | None = None, jobs: int = 1, decode_only: bool = False,
           link: Link | None = None, prefix: PrefixCache | None = None) -> list[Candidate]:
    """Every evaluated (layout, batch cap), ranked: feasible first, then tokens per dollar.
    `link`: the model-attention network (None: each attention table's `network` curve);
    `prefix`: the prefix cache every layout runs with (None: off)."""
    pricing = Pricing(trace, shape, tables, specs, slo, max_model_len, decode_only, link, prefix)
    work = [(pricing, lay, space.batch_caps) for lay in base_layouts(shape, tables, specs, space)]
    if jobs > 1:
        with mp.get_context("fork").Pool(jobs) as pool:
            ladders = pool.starmap(_ladder, work, chunksize=1)
    else:
        ladders = [_ladder(*job) for job in work]
    candidates = [c for ladder in ladders for c in ladder]
    return sorted(candidates, key=lambda c: (not c.feasible, -c.tokens_per_dollar))


@dataclass
class CacheRow:
    """One row of the prefix-cache comparison: a layout (`role`: recommended, colocated
    baseline) priced with the cache off, on the device only, or on with its host tier."""
    role: str
    cache: str
    candidate: Candidate

    def to_dict(self) -> dict:
        return {"role": self.role, "cache": self.cache, **self.candidate.to_dict()}


def cache_rows(pricing: Pricing, layouts: list[tuple[str, Layout]], host_cache_gib: float) -> list[CacheRow]:
    """The paper-style comparison with the prefix cache: each (role, layout) priced with the
    cache off, on (device blocks only) and, when `host_cache_gib` > 0, on with the host tier."""
    modes = [("off", None), ("on", PrefixCache(0.0))]
    if host_cache_gib > 0:
        modes.append((f"on + {host_cache_gib:g} GiB host", PrefixCache(host_cache_gib)))
    rows = []
    for role, layout in layouts:
        for cache, prefix in modes:
            candidate = replace(pricing, prefix=prefix).candidate(layout)
            assert candidate is not None, f"{layout.label} was priced by the search, so its weights fit"
            rows.append(CacheRow(role, cache, candidate))
    return rows
