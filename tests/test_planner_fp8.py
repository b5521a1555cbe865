"""The planner with an FP8 KV cache (issue 26): `kv_cache.dtype: fp8_e4m3` in a layout.

An e4m3 cache holds one byte per element, so a layout's caches hold twice the tokens of bf16
(planner/layout.py), and its attention is priced by the cost table's FP8 rows, or, in a table
without them, by the estimate (the bf16 decode rows at half the bytes) that the reports name
(planner/cost_table.py). Checked here: the capacity, both pricing rules, a simulated step that
gets faster, a search whose recommendation changes where memory binds, the two `lamina plan`
commands taking the dtype from a flag and from the config, and the profiler measuring FP8 rows
on this CPU.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_lamina import cli
from megatron_lamina.bench import cost_profile
from megatron_lamina.config import load_config
from megatron_lamina.planner.cost_table import CostTable, Curve, Grid
from megatron_lamina.planner.devices import DeviceSpec, load_prices
from megatron_lamina.planner.layout import Layout, config_yaml, kv_blocks_per_cache
from megatron_lamina.planner.link import Link
from megatron_lamina.planner.search import SearchSpace, Slo, search
from megatron_lamina.planner.shapes import PRESETS
from megatron_lamina.planner.simulator import simulate
from megatron_lamina.planner.synthetic import synthetic_cost_table
from megatron_lamina.planner.trace import TraceRequest

ROOT = Path(__file__).resolve().parents[1]
FP8 = "fp8_e4m3"
SHAPE = PRESETS["tiny"]


def linear_table(fp8_rows: bool = False) -> CostTable:
    """bf16 costs whose decode attention is linear in the context (1 ms per 1,000 tokens of
    one request, x batch); with `fp8_rows`, FP8 rows at a third of that (unlike the estimate's half)."""
    batch, context = [1.0, 64.0], [1.0, 10000.0]

    def grid(per_token):
        return Grid(batch, context, [[b * c * per_token for c in context] for b in batch])

    rows = {"attention_decode_fp8": grid(1e-6 / 3), "attention_prefill_fp8": Curve([1.0], [1e-3])} if fp8_rows else {}
    return CostTable("X", "synthetic: linear test costs", SHAPE, "bfloat16",
                     model_layer={1: Curve([1.0], [1e-3])}, step_overhead={1: Curve([1.0], [1e-3])},
                     attention_decode=grid(1e-6), attention_prefill=Curve([1.0], [1e-3]),
                     network=Curve([1.0], [1e-5]), **rows)


def test_fp8_kv_doubles_the_tokens_of_every_cache(tmp_path):
    specs, _ = load_prices()
    shape = PRESETS["llama3-8b"]
    for layout in (Layout("H100", 1, None, 0, 1, 1, 64), Layout("H100", 1, "H20", 2, 2, 2, 256)):
        bf16 = kv_blocks_per_cache(layout, shape, specs, 2)
        fp8 = kv_blocks_per_cache(replace(layout, kv_cache_dtype=FP8), shape, specs, 2)
        assert bf16 > 0 and fp8 in (2 * bf16, 2 * bf16 + 1)   # half the bytes a block: twice the blocks
    layout = Layout("H100", 1, "H20", 2, 2, 2, 256, kv_cache_dtype=FP8)
    assert layout.label.endswith(" fp8kv")
    path = tmp_path / "c.yaml"
    path.write_text(config_yaml(layout, "checkpoints/llama", "bfloat16", ["a header"]))
    assert load_config(path).kv_cache.dtype == FP8


def test_fp8_attention_uses_the_fp8_rows_or_the_estimate(tmp_path):
    estimate, measured = linear_table(), linear_table(fp8_rows=True)
    # No FP8 rows: a context of 2,000 costs what the bf16 rows give for 1,000 (half the bytes).
    assert estimate.decode_attention_time(8, 8 * 2000, FP8) == pytest.approx(estimate.decode_attention_time(8, 8 * 1000))
    assert estimate.decode_attention_time(8, 8 * 2000, FP8) == pytest.approx(8 * 1000 * 1e-6)
    assert "ESTIMATED from the bfloat16 rows" in estimate.kv_attention_source(FP8)
    # FP8 rows: theirs, not the estimate.
    assert measured.decode_attention_time(8, 8 * 2000, FP8) == pytest.approx(8 * 2000 * 1e-6 / 3)
    assert "FP8 rows" in measured.kv_attention_source(FP8) and "ESTIMATED" not in measured.kv_attention_source(FP8)
    # The model's dtype is priced by the bf16 rows either way.
    assert measured.decode_attention_time(8, 8 * 2000) == estimate.decode_attention_time(8, 8 * 2000)
    # The rows survive the JSON; a table without them writes none.
    measured.save(tmp_path / "m.json")
    estimate.save(tmp_path / "e.json")
    assert CostTable.load(tmp_path / "m.json").to_dict() == measured.to_dict()
    assert "attention_decode_fp8" not in json.loads((tmp_path / "e.json").read_text())
    assert not CostTable.load(tmp_path / "e.json").has_fp8_rows()


def test_fp8_kv_lowers_the_simulated_attention_time():
    trace = [TraceRequest(0.0, 150, 64) for _ in range(8)]
    layout = Layout("X", 1, None, 0, 1, 1, 8, 4096, 16)
    results = {}
    for kv in ("auto", FP8):
        for table in (linear_table(), linear_table(fp8_rows=True)):
            results[kv, table.has_fp8_rows()] = simulate(trace, replace(layout, kv_cache_dtype=kv), SHAPE,
                                                         table, None, 10000)
    bf16 = results["auto", False]
    assert results["auto", True].tpot_s == bf16.tpot_s   # FP8 rows are not read for a bf16 cache
    for rows in (False, True):
        fp8 = results[FP8, rows]
        assert fp8.output_tokens == bf16.output_tokens and fp8.steps == bf16.steps
        assert fp8.tpot_s["p50"] < bf16.tpot_s["p50"] and fp8.duration_s < bf16.duration_s
    assert results[FP8, True].tpot_s["p50"] < results[FP8, False].tpot_s["p50"]  # a third beats the half


def test_fp8_kv_changes_the_recommendation_where_memory_binds():
    """SMALL's memory leaves about 3,000 tokens of bf16 KV beside LLaMA-3-8B's weights: a
    3,500-token prompt does not fit colocated, so bf16 must rent a dear attention device;
    an FP8 cache holds the prompt on SMALL itself, and that is what the search recommends."""
    shape = PRESETS["llama3-8b"]
    small = DeviceSpec("SMALL", 2.0, 989, (shape.weight_bytes(2) + 4e9 + 0.4e9) / 0.9 / 1e9, 3.35, 450)
    dear = DeviceSpec("DEAR", 50.0, 989, 80, 3.35, 450)
    specs = {"SMALL": small, "DEAR": dear}
    link = Link("test", 400, 10)
    tables = {name: synthetic_cost_table(shape, spec, link, [1]) for name, spec in specs.items()}
    trace = [TraceRequest(0.0, 3500, 32) for _ in range(8)]
    space = SearchSpace(model_devices=("SMALL",), attention_devices=("DEAR",), tp_sizes=(1,),
                        attention_workers=(1,), micro_batches=(2,), batch_caps=(4, 8))

    def best(kv_dtypes):
        ranked = search(trace, shape, tables, specs, Slo(tpot_s=10.0), replace(space, kv_cache_dtypes=kv_dtypes))
        return ranked[0], ranked

    bf16, ranked = best(("auto",))
    assert bf16.feasible and not bf16.layout.colocated
    colocated = [c for c in ranked if c.layout.colocated]
    assert colocated and all("KV cache too small" in c.why_not for c in colocated)
    fp8, _ = best((FP8,))
    assert fp8.feasible and fp8.layout.colocated and fp8.layout.kv_cache_dtype == FP8
    both, _ = best(("auto", FP8))
    assert both.layout == fp8.layout and both.tokens_per_dollar > bf16.tokens_per_dollar


def write_trace(path: Path, count: int = 12) -> Path:
    rows = [f"2023-11-16 18:15:{i:02d}.0000000,{100 + 5 * i},{20 + i}" for i in range(count)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    return path


def plan(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_simulate_reads_the_kv_dtype_from_the_config(tmp_path, capsys):
    trace = write_trace(tmp_path / "trace.csv")
    linear_table().save(tmp_path / "x.json")
    config = tmp_path / "c.yaml"
    config.write_text(config_yaml(Layout("X", 1, None, 0, 1, 1, 8), "unused", "bfloat16", []))
    reports = {}
    for kv in ("auto", FP8):
        out = tmp_path / f"{kv}.json"
        code, _, err = plan(capsys, "simulate", "--config", str(config), "--set", f"kv_cache.dtype={kv}",
                            "--model", "tiny", "--costs", str(tmp_path / "x.json"), "--model-device", "X",
                            "--trace", str(trace), "--saturate", "--out", str(out), "--prices",
                            str(write_prices(tmp_path)))
        assert code == 0, err
        reports[kv] = json.loads(out.read_text())
    bf16, fp8 = reports["auto"], reports[FP8]
    assert fp8["layout"]["kv_cache_dtype"] == FP8 and fp8["num_blocks"] in (2 * bf16["num_blocks"],
                                                                             2 * bf16["num_blocks"] + 1)
    assert "ESTIMATED" in fp8["kv_sources"][0] and bf16["kv_sources"] == []
    assert fp8["tpot_s"]["p50"] < bf16["tpot_s"]["p50"]


def write_prices(tmp_path: Path) -> Path:
    """A device X of 16 GB (the tiny shape's weights are small: its cache binds on nothing here)."""
    path = tmp_path / "prices.yaml"
    path.write_text("devices:\n  X: {price_per_hour: 1.0, tflops: 100, memory_gb: 16, bandwidth_tbs: 1.0, "
                    "nvlink_gbs: 100}\ninterconnect: {bandwidth_gbs: 50, latency_us: 10}\n")
    return path


def test_plan_search_takes_the_kv_dtype_flag(tmp_path, capsys):
    trace = write_trace(tmp_path / "trace.csv")
    linear_table().save(tmp_path / "x.json")
    config = tmp_path / "best.yaml"
    code, out, err = plan(capsys, "search", "--model", "tiny", "--costs", str(tmp_path / "x.json"),
                          "--prices", str(write_prices(tmp_path)), "--model-devices", "X", "--attention-devices",
                          "", "--tp", "1", "--batch-caps", "8", "--trace", str(trace), "--slo-tpot", "10",
                          "--kv-cache-dtype", f"auto,{FP8}", "--out-dir", str(tmp_path / "plan"),
                          "--config-out", str(config))
    assert code == 0, err
    report = json.loads((tmp_path / "plan" / "ranking.json").read_text())
    assert {c["layout"]["kv_cache_dtype"] for c in report["ranking"]} == {"auto", FP8}
    assert report["recommended"]["layout"]["kv_cache_dtype"] == FP8   # same blocks needed, faster attention
    assert "ESTIMATED" in report["kv_sources"][0] and "kv X: attention over an fp8_e4m3" in out
    assert load_config(config).kv_cache.dtype == FP8 and "ESTIMATED" in config.read_text()
    with pytest.raises(SystemExit) as refused:
        cli.main(["plan", "search", "--model", "tiny", "--trace", str(trace), "--slo-tpot", "1",
                  "--kv-cache-dtype", "fp8"])
    assert refused.value.code == 2
    assert "--kv-cache-dtype: 'fp8': allowed values are auto, fp8_e4m3" in capsys.readouterr().err


def test_the_profiler_measures_fp8_rows_on_this_cpu(tmp_path, capsys):
    base = tmp_path / "base.json"
    replace(linear_table(), device="CPU", source="measured on a test", dtype="float32").save(base)
    out = tmp_path / "fp8.json"
    code = cost_profile.main(["--parts", "attention", "--fp8-kv", "--merge-into", str(base), "--batches", "1,4",
                              "--contexts", "16,64", "--prefill", "0+16", "--warmup", "0", "--repeats", "1",
                              "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    table = CostTable.load(out)
    assert table.has_fp8_rows() and table.meta["fp8_kv"] and "fp8_e4m3 KV cache" in table.source
    assert table.attention_decode_fp8.batch == [1.0, 4.0] and table.attention_decode_fp8.context == [16.0, 64.0]
    assert "FP8 rows" in table.kv_attention_source(FP8)
