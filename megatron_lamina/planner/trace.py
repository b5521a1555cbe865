"""Request traces: arrival times and token counts (shared/traces, README there).

`read_trace(path)` reads an Azure LLM inference trace (CSV: TIMESTAMP, ContextTokens,
GeneratedTokens) or a Mooncake trace (JSONL: timestamp in ms, input_length, output_length,
hash_ids: its prompt's shared 512-token blocks) into `TraceRequest`s with arrival times in seconds from the first request. `select` takes a
slice, rescales or replaces the arrival process and clips lengths for small models. Both
tools/bench_serving.py and the simulator replay the same `TraceRequest` lists.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path


TRACE_BLOCK = 512  # prompt tokens per Mooncake hash id


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float    # from the start of the replay
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()  # Mooncake: one id per 512-token prompt block, equal ids equal blocks


def trace_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "azure"
    if suffix in (".jsonl", ".json"):
        return "mooncake"
    raise ValueError(f"{path}: cannot tell the trace format from the suffix; expected .csv "
                     "(Azure) or .jsonl (Mooncake)")


def read_trace(path: str | Path, limit: int | None = None, skip: int = 0) -> list[TraceRequest]:
    """Requests `skip` .. `skip + limit` of the trace, arrivals relative to the first of them."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such trace file (traces are in ../shared/traces)")
    rows = _read_azure(path) if trace_format(path) == "azure" else _read_mooncake(path)
    out: list[tuple[float, int, int, tuple[int, ...]]] = []
    for i, row in enumerate(rows):
        if i < skip:
            continue
        if limit is not None and len(out) >= limit:
            break
        out.append(row)
    if not out:
        raise ValueError(f"{path}: no requests after skipping {skip}")
    start = min(row[0] for row in out)
    return sorted((TraceRequest(t - start, n_in, n_out, ids) for t, n_in, n_out, ids in out),
                  key=lambda r: r.arrival_s)


def _read_azure(path: Path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not an Azure trace, missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                stamp = row["TIMESTAMP"].strip()
                day, _, frac = stamp.partition(".")
                t = datetime.strptime(day, "%Y-%m-%d %H:%M:%S").timestamp() + float(f"0.{frac or 0}")
                yield t, int(row["ContextTokens"]), int(row["GeneratedTokens"]), ()
            except (ValueError, AttributeError) as e:
                raise ValueError(f"{path}:{line}: cannot read {row!r} ({e})") from None


def _read_mooncake(path: Path):
    with open(path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                yield (row["timestamp"] / 1000.0, int(row["input_length"]), int(row["output_length"]),
                       tuple(int(h) for h in row.get("hash_ids", ())))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line}: not a Mooncake request ({e})") from None


@dataclass
class Clipping:
    input_clipped: int = 0
    output_clipped: int = 0


def select(requests: list[TraceRequest], *, rate_scale: float = 1.0, poisson_rate: float | None = None,
           seed: int = 0, max_input_len: int | None = None, max_output_len: int | None = None,
           duration_s: float | None = None) -> tuple[list[TraceRequest], Clipping]:
    """The requests to replay: arrivals divided by `rate_scale` (2 = twice as fast), or
    replaced by a Poisson process of `poisson_rate` requests/s; lengths clipped to the
    maxima (counted in the returned `Clipping`); only arrivals before `duration_s`."""
    if rate_scale <= 0:
        raise ValueError(f"rate scale {rate_scale}: must be > 0")
    rng = random.Random(seed)
    clipping, out, t = Clipping(), [], 0.0
    for r in requests:
        if poisson_rate is not None:
            if poisson_rate <= 0:
                raise ValueError(f"Poisson rate {poisson_rate}: must be > 0 requests/s")
            arrival = t
            t += rng.expovariate(poisson_rate)
        else:
            arrival = r.arrival_s / rate_scale
        if duration_s is not None and arrival >= duration_s:
            break
        n_in, n_out = r.input_len, r.output_len
        if max_input_len is not None and n_in > max_input_len:
            n_in, clipping.input_clipped = max_input_len, clipping.input_clipped + 1
        if max_output_len is not None and n_out > max_output_len:
            n_out, clipping.output_clipped = max_output_len, clipping.output_clipped + 1
        out.append(replace(r, arrival_s=arrival, input_len=max(1, n_in), output_len=max(1, n_out)))
    return out, clipping
