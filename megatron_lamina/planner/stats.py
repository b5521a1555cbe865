"""Latency statistics shared by the simulator and tools/bench_serving.py, so that a
prediction and a measurement are summarized the same way."""

from __future__ import annotations

import math

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile with linear interpolation between order statistics (numpy's
    default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summarize(values: list[float]) -> dict[str, float | int | None]:
    """{count, mean, p50, p90, p99, max}; None where there are no values (JSON-friendly)."""
    if not values:
        return {"count": 0, "mean": None, **{f"p{p}": None for p in PERCENTILES}, "max": None}
    return {"count": len(values), "mean": sum(values) / len(values),
            **{f"p{p}": percentile(values, p) for p in PERCENTILES}, "max": max(values)}
