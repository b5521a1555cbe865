"""tools/bench_host_step.py runs from a checkout and prints its table: every row, every figure
a number (no threshold on them: timings are not tested). The whole-step benchmark runs the real
scheduler's decode steps, and its "before" and "after" paths build the same attention index."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lamina.bench.host_step import whole_step_ms

ROOT = Path(__file__).resolve().parents[1]


def test_the_host_step_benchmark_prints_its_table():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_host_step.py"), "--repeats", "2"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.strip().splitlines()
    assert rows[0].startswith("| host work |") and len(rows) == 2 + 2 + 4 + 2 + 2 * 4
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[3]) > 0, row
    whole = [row for row in rows if row.startswith("| whole step,")]
    assert [row.split("|")[2].strip() for row in whole] == ["256 x 1K", "256 x 8K", "1024 x 1K", "1024 x 8K"] * 2
    assert all(("8K/1K" in row) == ("x 8K" in row) for row in whole)


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
