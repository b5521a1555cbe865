"""Cost tables: what one device type costs for the pieces of an engine step (JSON on disk).

tools/profile_costs.py measures a table on a device (or `synthetic.py` derives one from a
datasheet); the simulator reads it through the lookups below. One table is for one device
type, one model shape and one dtype. Times are seconds:

  model_layer[tp]     the model-worker side of ONE layer for a micro-batch of `tokens`
                      tokens (decode tokens and prefill-chunk tokens alike; everything but
                      core attention: norms, QKV, RoPE, out-proj, MLP, TP all-reduces)
  step_overhead[tp]   once per step, outside the layers, vs sampled rows: embedding, final
                      norm, LM head, logits gather, sampling (a step that samples nothing
                      costs the first point's value)
  attention_decode    core attention of ONE layer, all KV heads on one device, for `batch`
                      decode requests of mean context `context` (grid)
  attention_prefill   core attention of ONE layer, all KV heads, for one prefill chunk, vs its
                      query-key pairs: a chunk of n tokens ending at context c has
                      n*c - n*(n-1)/2 pairs (causal)
  network             one-way transfer time between a model worker and an attention worker
                      vs message bytes (latency + bytes / bandwidth, as measured)
  attention_decode_fp8, attention_prefill_fp8
                      optional: the same two over an e4m3 KV cache (kv_cache.dtype fp8_e4m3;
                      tools/profile_costs.py --fp8-kv). A table without them prices FP8 KV by
                      an ESTIMATE (`kv_attention_source` says which): decode attention reads
                      every cached byte once, so an e4m3 cache of context C costs what the
                      table's dtype costs at C x (1 / its bytes per element); prefill attention
                      is compute-bound (the kernels dequantize in registers) and keeps its time.

Lookups interpolate linearly (bilinearly on the grid). Below the first point a curve keeps
the first value (a cost does not vanish for smaller work); beyond the last it continues the
last segment's slope, never decreasing. `source` says "measured ..." or "synthetic ...", and
every report repeats it, so a synthetic number is never mistaken for a measured one.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_lamina.fp8 import FP8, FP8_NAME
from megatron_lamina.planner.shapes import ModelShape

FORMAT = "megatron-lamina/cost-table/1"


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear y(x): the first y below xs[0], the last segment's slope (never
    decreasing) past xs[-1]."""
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    i = min(bisect.bisect_right(xs, x) - 1, len(xs) - 2)
    w = (x - xs[i]) / (xs[i + 1] - xs[i])
    y = ys[i] + w * (ys[i + 1] - ys[i])
    return max(y, ys[-1]) if w > 1 else y


@dataclass
class Curve:
    """y(x), piecewise linear over increasing x."""

    x: list[float]
    y: list[float]

    def __post_init__(self):
        assert len(self.x) == len(self.y) >= 1, "a curve needs matching, non-empty x and y"
        assert all(a < b for a, b in zip(self.x, self.x[1:])), f"curve x must increase: {self.x}"

    def __call__(self, x: float) -> float:
        return interpolate(self.x, self.y, x)

    def to_dict(self) -> dict:
        return {"x": list(self.x), "seconds": list(self.y)}

    @classmethod
    def from_dict(cls, d: dict) -> "Curve":
        return cls([float(v) for v in d["x"]], [float(v) for v in d["seconds"]])


@dataclass
class Grid:
    """z(batch, context), bilinear over an increasing batch axis and context axis."""

    batch: list[float]
    context: list[float]
    seconds: list[list[float]]  # [len(batch)][len(context)]

    def __post_init__(self):
        assert len(self.seconds) == len(self.batch) and all(len(r) == len(self.context) for r in self.seconds)
        Curve(self.batch, self.batch), Curve(self.context, self.context)  # axes must increase

    def __call__(self, batch: float, context: float) -> float:
        along_context = [interpolate(self.context, row, context) for row in self.seconds]
        return interpolate(self.batch, along_context, batch)

    def to_dict(self) -> dict:
        return {"batch": list(self.batch), "context": list(self.context), "seconds": [list(r) for r in self.seconds]}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls([float(v) for v in d["batch"]], [float(v) for v in d["context"]],
                   [[float(v) for v in row] for row in d["seconds"]])


@dataclass
class CostTable:
    device: str                      # the device type it describes, a key of prices.yaml
    source: str                      # "measured on ..." or "synthetic: ..."
    shape: ModelShape
    dtype: str
    model_layer: dict[int, Curve]    # TP size -> seconds per layer vs tokens
    step_overhead: dict[int, Curve]  # TP size -> seconds per step vs sampled rows
    attention_decode: Grid
    attention_prefill: Curve
    network: Curve
    meta: dict = field(default_factory=dict)
    attention_decode_fp8: Grid | None = None     # the module docstring's FP8 rows
    attention_prefill_fp8: Curve | None = None

    @property
    def dtype_bytes(self) -> int:
        return {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]

    @property
    def synthetic(self) -> bool:
        return self.source.startswith("synthetic")

    def tp_sizes(self) -> list[int]:
        return sorted(set(self.model_layer) & set(self.step_overhead))

    def model_time(self, tp: int, tokens: int) -> float:
        try:
            return self.model_layer[tp](tokens)
        except KeyError:
            raise ValueError(f"cost table for {self.device} has no model times for TP={tp} "
                             f"(it has TP {self.tp_sizes()}); profile that TP size") from None

    def overhead_time(self, tp: int, rows: int) -> float:
        return self.step_overhead[tp](rows)

    def has_fp8_rows(self) -> bool:
        return self.attention_decode_fp8 is not None and self.attention_prefill_fp8 is not None

    def kv_attention_source(self, kv_dtype: str) -> str:
        """Where this table's attention times for a `kv_cache.dtype` come from."""
        if kv_dtype != FP8_NAME:
            return f"{self.device}: attention over a {self.dtype} KV cache, the table's rows"
        if self.has_fp8_rows():
            return f"{self.device}: attention over an fp8_e4m3 KV cache, the table's FP8 rows"
        return (f"{self.device}: attention over an fp8_e4m3 KV cache, ESTIMATED from the {self.dtype} rows "
                f"(decode at 1/{self.dtype_bytes // FP8.itemsize} of the bytes, prefill unchanged; "
                "no FP8 rows in this table: tools/profile_costs.py --fp8-kv measures them)")

    def decode_attention_time(self, requests: int, context_sum: int, kv_dtype: str = "auto") -> float:
        if not requests:
            return 0.0
        context = context_sum / requests
        if kv_dtype != FP8_NAME:
            return self.attention_decode(requests, context)
        if self.has_fp8_rows():
            return self.attention_decode_fp8(requests, context)
        return self.attention_decode(requests, context * FP8.itemsize / self.dtype_bytes)  # the estimate

    def prefill_attention_time(self, pairs: int, kv_dtype: str = "auto") -> float:
        if kv_dtype == FP8_NAME and self.has_fp8_rows():
            return self.attention_prefill_fp8(pairs)
        return self.attention_prefill(pairs)

    def network_time(self, nbytes: float) -> float:
        return self.network(nbytes)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "device": self.device, "source": self.source,
                "shape": self.shape.to_dict(), "dtype": self.dtype,
                "model_layer": {str(tp): c.to_dict() for tp, c in sorted(self.model_layer.items())},
                "step_overhead": {str(tp): c.to_dict() for tp, c in sorted(self.step_overhead.items())},
                "attention_decode": self.attention_decode.to_dict(),
                "attention_prefill": self.attention_prefill.to_dict(),
                "network": self.network.to_dict(), "meta": self.meta,
                **({"attention_decode_fp8": self.attention_decode_fp8.to_dict(),
                    "attention_prefill_fp8": self.attention_prefill_fp8.to_dict()} if self.has_fp8_rows() else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "CostTable":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a cost table: format is {d.get('format')!r}, expected {FORMAT!r} "
                             "(tools/profile_costs.py writes them)")
        return cls(device=d["device"], source=d["source"], shape=ModelShape.from_dict(d["shape"]),
                   dtype=d["dtype"],
                   model_layer={int(tp): Curve.from_dict(c) for tp, c in d["model_layer"].items()},
                   step_overhead={int(tp): Curve.from_dict(c) for tp, c in d["step_overhead"].items()},
                   attention_decode=Grid.from_dict(d["attention_decode"]),
                   attention_prefill=Curve.from_dict(d["attention_prefill"]),
                   network=Curve.from_dict(d["network"]), meta=d.get("meta", {}),
                   attention_decode_fp8=Grid.from_dict(d["attention_decode_fp8"]) if "attention_decode_fp8" in d else None,
                   attention_prefill_fp8=(Curve.from_dict(d["attention_prefill_fp8"])
                                          if "attention_prefill_fp8" in d else None))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CostTable":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ValueError(f"{path}: no such cost table (write one with tools/profile_costs.py)") from None


def prefill_pairs(tokens: int, context_end: int) -> int:
    """Causal query-key pairs of a chunk of `tokens` tokens whose last one is at position
    context_end - 1: query i (0-based in the chunk) sees context_end - tokens + i + 1 keys."""
    return tokens * context_end - tokens * (tokens - 1) // 2
