"""bench/coordinate_search.py, the search the FP8 kernel sweep (bench/fp8_speed.py) runs in its
one device call: which configurations it measures, in which order, which it keeps, and that
a configuration that fails is recorded and passed over. The measure here is a table of
made-up costs (the search's logic is what is tested; the kernel's timings need a GPU, and
test_gpu.py runs the sweep itself on one)."""

from __future__ import annotations

import math

from megatron_lamina.bench.coordinate_search import coordinate_search

# Costs by (tile, stages): tile 128 wins at the default stages, and then stages 4 beats 3
# only at tile 128 (a coordinate search finds it; trying stages at the default tile would not).
COSTS = {(64, 3): 10.0, (128, 3): 8.0, (256, 3): 9.0, (64, 4): 11.0, (128, 4): 7.0, (128, 2): 8.5,
         (256, 2): 9.5, (256, 4): 9.2}
AXES = [("tile", [{"tile": 64}, {"tile": 128}, {"tile": 256}]), ("stages", [{"stages": 2}, {"stages": 3}, {"stages": 4}])]


def test_each_axis_from_the_best_so_far_each_configuration_once():
    measured = []

    def measure(config):
        measured.append((config["tile"], config["stages"]))
        return COSTS[measured[-1]]

    rows = list(coordinate_search(measure, {"tile": 64, "stages": 3}, AXES))
    # The default once (the tile axis's 64 and the stages axis's 3 are launches already measured).
    assert measured == [(64, 3), (128, 3), (256, 3), (128, 2), (128, 4)]
    assert [row["axis"] for row in rows] == ["default", "tile", "tile", "stages", "stages"]
    assert min(rows, key=lambda row: row["ms"])["config"] == {"tile": 128, "stages": 4}
    assert all(row["error"] is None for row in rows)


def test_a_failing_configuration_is_recorded_and_never_kept():
    def measure(config):
        if config["tile"] == 128:
            raise RuntimeError("out of shared memory")
        return COSTS[(config["tile"], config["stages"])]

    rows = list(coordinate_search(measure, {"tile": 64, "stages": 3}, AXES))
    failed = [row for row in rows if row["ms"] is None]
    assert [row["config"] for row in failed] == [{"tile": 128, "stages": 3}]
    assert failed[0]["error"] == "RuntimeError: out of shared memory"
    # Stages are searched from tile 256 (the fastest that ran), not from the failed 128.
    assert [row["config"] for row in rows if row["axis"] == "stages"] == [{"tile": 256, "stages": 2},
                                                                          {"tile": 256, "stages": 4}]


def test_key_says_which_configurations_are_the_same_launch():
    """`key` folds settings that launch the same kernel (fp8_speed: waves that give the same
    split count, here waves / 2 rounded up): waves 1 is not measured after waves 2."""
    measured = []

    def measure(config):
        measured.append(config["waves"])
        return 1.0

    rows = list(coordinate_search(measure, {"waves": 2.0}, [("splits", [{"waves": w} for w in (1.0, 2.0, 4.0)])],
                                  key=lambda c: math.ceil(c["waves"] / 2)))
    assert measured == [2.0, 4.0] and len(rows) == 2
