"""Python's cycle collector in a launched rank: the thresholds it runs at, from the rank's
first line on.

A rank's start-up imports torch and Megatron-core and builds the model: a few hundred
thousand tracked objects that live as long as the process. At Python's default thresholds
(700, 10, 10) a young collection ran every 700 allocations and a full one, walking all
of them, every few dozen of those: a good share of a rank's start-up CPU went into
collections that found almost nothing (docs/BENCHMARKS.md, "Start-up cost"). The
launchers (launch/serve.py, launch/generate.py) call `collect_rarely` before their
imports, so start-up runs at the thresholds the serving loop keeps (`runtime.quiet_gc`
sets them again after freezing the start-up heap). Not for `LLM`, whose caller owns its
process's collector. This module imports nothing heavy: it runs before torch is loaded.
"""

from __future__ import annotations

import gc

THRESHOLDS = (10_000, 10, 10)  # a young collection every 10,000 allocations, as while serving


def collect_rarely() -> None:
    gc.set_threshold(*THRESHOLDS)
