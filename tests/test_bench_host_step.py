"""tools/bench_host_step.py prints its table (run in this process, as its `main`): every row
in order, every figure a number, each whole step's figure the parts its note names, the
ratios the note states computed from the figures beside them (no threshold on the timings:
they are not tested). The whole-step benchmark runs the real scheduler's decode steps, and its
"before" and "after" paths build the same attention index."""

from __future__ import annotations

import gc
import re
import runpy
from pathlib import Path

import numpy as np
import pytest

from megatron_lamina.bench.host_step import whole_step_ms

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"(\d+\.\d+)"


@pytest.fixture(autouse=True)
def collector_put_back():
    """The "after" figures run Python's collector as a launched rank sets it (runtime.quiet_gc):
    the test session's own is put back after each test."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_the_host_step_benchmark_prints_its_table(capsys):
    main = runpy.run_path(str(ROOT / "tools" / "bench_host_step.py"))["main"]
    assert main(["--repeats", "2"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("| host work |") and len(rows) == 2 + 2 + 4 + 2 + 2 * 4
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]
    assert [c[0] for c in cells] == ["sampler, temperature 1.0"] * 2 + ["padded block tables"] * 4 + \
        ["plan encode + decode"] * 2 + ["whole step, colocated"] * 4 + ["whole step, disaggregated"] * 4
    assert [c[1] for c in cells[-8:]] == ["256 x 1K", "256 x 8K", "1024 x 1K", "1024 x 8K"] * 2
    for c in cells:
        float(c[2]), float(c[3])  # before, after: numbers
    after_1k = {}
    for c in cells[-8:]:
        before, after = float(c[2]), float(c[3])
        after_1k.setdefault((c[0], c[1].split()[0]), after)
        parts = re.match(rf"schedule {NUMBER} \+ plan {NUMBER} \+ tables/index {NUMBER} \(before {NUMBER} \+ "
                         rf"{NUMBER} \+ {NUMBER}\); after/before {NUMBER}(; 8K/1K {NUMBER})?$", c[4])
        assert parts, c[4]
        assert float(parts[7]) == pytest.approx(after / before, abs=0.006)  # the ratio is the two figures'
        assert (parts[9] is not None) == c[1].endswith("8K")  # flatness is stated for each 8K row
        if parts[9] is not None:  # against the same layout and batch at 1K
            assert float(parts[9]) == pytest.approx(after / after_1k[(c[0], c[1].split()[0])], abs=0.006)


def test_the_benchmark_runs_only_the_parts_asked_for(capsys):
    main = runpy.run_path(str(ROOT / "tools" / "bench_host_step.py"))["main"]
    assert main(["--repeats", "2", "--only", "plan", "whole", "--layout", "disaggregated"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert [[c.strip() for c in row.strip("|").split("|")][:2] for row in rows[2:]] == \
        [["plan encode + decode", "256 requests"], ["plan encode + decode", "1024 requests"]] + \
        [["whole step, disaggregated", size] for size in ("256 x 1K", "256 x 8K", "1024 x 1K", "1024 x 8K")]


@pytest.mark.parametrize("layout", ["colocated", "disaggregated"])
def test_before_and_after_build_the_same_index_of_the_schedulers_decode_step(layout):
    batch, context, block_size = 40, 100, 16
    before, after = (whole_step_ms(layout, batch, context, block_size, 20, new) for new in (False, True))
    for key in ("new_slots", "lens"):
        assert np.array_equal(before["arrays"][key], after["arrays"][key]), key
    lens = after["arrays"]["lens"]
    # The tables gathered on the device agree up to each row's length (no kernel reads past it).
    assert before["arrays"]["tables"].shape == after["arrays"]["tables"].shape
    for row, n in enumerate(lens):
        used = -(-int(n) // block_size)
        assert np.array_equal(before["arrays"]["tables"][row, :used], after["arrays"]["tables"][row, :used]), row
    # The receiver's first micro-batch: every request colocated; at most its shard's half
    # disaggregated (the shards take turns at admission).
    assert len(lens) == batch if layout == "colocated" else 0 < len(lens) <= batch // 2
    # Decode rows past the 20 steps (and warm-up) the requests ran after their prompts.
    assert lens.min() > context - block_size and lens.max() <= context + 1 + 22
    assert after["arrays"]["tables"].shape[1] == -(-int(lens.max()) // block_size)
    for t in (before, after):
        assert t["step"] >= t["index"] > 0 and t["schedule"] > 0 and t["plan"] > 0
