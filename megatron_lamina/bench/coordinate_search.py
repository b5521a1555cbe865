"""A coordinate search over a kernel's launch settings, for benchmarks that have one device
call to find a good configuration in (bench/fp8_speed.py's decode kernel sweep).

The full product of a kernel's settings (variant flags x tile x warps x stages x splits) is
hundreds of compiles; a search that changes one axis at a time from the default, and keeps
each axis's fastest option for the axes after it, measures a dozen or so and still finds
where the variants combine (a flag that only pays at another tile is tried at the tile the
earlier axes chose). Each distinct configuration is measured once, so an option equal to
the current best (often the default's own value) costs nothing; `key` says which settings
make two configurations the same launch. A configuration that fails (a tile that does not
fit the device) is recorded with its error and never chosen.
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterator, Sequence


def coordinate_search(measure: Callable[[dict], float], start: dict,
                      axes: Sequence[tuple[str, Sequence[dict]]],
                      key: Callable[[dict], Hashable] = lambda c: tuple(sorted(c.items()))) -> Iterator[dict]:
    """`measure(config)` -> ms, for `start` and then, axis by axis, for the best configuration
    so far updated by each option of the axis. Yields one row per distinct configuration as
    it is measured: {"axis", "config", "ms", "error"} (ms None where measure raised), the
    first `start`'s (axis "default")."""
    seen: dict[Hashable, float | None] = {}
    best, best_ms = start, None
    for axis, options in [("default", [{}]), *axes]:
        for option in options:
            config = {**best, **option}
            k = key(config)
            if k not in seen:
                try:
                    ms, error = measure(config), None
                except Exception as e:  # noqa: BLE001 -- a launch that does not fit is a result, not the end
                    ms, error = None, f"{type(e).__name__}: {str(e)[:200]}"
                seen[k] = ms
                yield {"axis": axis, "config": config, "ms": ms, "error": error}
            if seen[k] is not None and (best_ms is None or seen[k] < best_ms):
                best, best_ms = config, seen[k]
