"""tools/bench_host_step.py runs from a checkout and prints its table: every row, every figure
a number (no threshold on them: timings are not tested)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_host_step_benchmark_prints_its_table():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_host_step.py"), "--repeats", "2"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.strip().splitlines()
    assert rows[0].startswith("| host work |") and len(rows) == 2 + 2 + 4 + 2
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[3]) > 0, row
