"""The planner's commands, in this process: `lamina plan` (planner/command.py: search,
simulate) and the cost profiler (bench/cost_profile.py, tools/profile_costs.py's program).

`search` on synthetic (datasheet) costs and a small trace slice must print a ranking, write
a JSON of every evaluated layout, a PNG, and a recommended config that our config loader
accepts; `simulate` predicts one config. The profiler measures a tiny cost table on this
CPU, which the simulator then runs on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_lamina import cli
from megatron_lamina.bench import cost_profile
from megatron_lamina.config import load_config
from megatron_lamina.planner.cost_table import CostTable
from megatron_lamina.planner.layout import Layout
from megatron_lamina.planner.shapes import PRESETS
from megatron_lamina.planner.simulator import simulate
from megatron_lamina.planner.trace import TraceRequest

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
AZURE_CONV = TRACES / "AzureLLMInferenceTrace_conv.csv"
needs_traces = pytest.mark.skipif(not AZURE_CONV.is_file(),
                                  reason=f"no request traces at {TRACES} (CI copies shared/ beside the clone)")


def plan(argv: list[str]) -> int:
    """`lamina plan ARGV...`, as the console script runs it."""
    return cli.main(["plan", *argv])


@pytest.fixture
def profile(capsys):
    """The profiler's command line in this process: (exit code, stdout, stderr). Its rank 0 is
    this process: the torch thread count it sets (--threads) is put back."""
    threads = torch.get_num_threads()

    def run(*argv: str):
        try:
            code = cost_profile.main(list(argv))
        finally:
            torch.set_num_threads(threads)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@needs_traces
def test_plan_search_writes_ranking_plot_and_config(tmp_path, capsys):
    config = tmp_path / "configs" / "planned.yaml"
    code = plan([
        "search", "--model", "llama3-8b", "--synthetic", "--trace", str(AZURE_CONV), "--requests", "100",
        "--max-input-len", "4000", "--slo-tpot", "0.2", "--tp", "1", "--attention-workers", "1,2",
        "--attention-devices", "H20", "--micro-batches", "2", "--batch-caps", "32,64",
        "--out-dir", str(tmp_path / "plan"), "--config-out", str(config)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "synthetic: roofline from H100 datasheet" in printed and "recommended:" in printed
    assert "prefix cache off (the trace has no hash_ids" in printed
    report = json.loads((tmp_path / "plan" / "ranking.json").read_text())
    assert report["synthetic"] and report["requests"] == 100
    assert not report["prefix_caching"] and report["prefix_cache_comparison"] == []  # Azure: no hash_ids
    labels = [c["label"] for c in report["ranking"]]
    assert {"1xH100 TP1 n1 b32", "1xH100 + 2xH20 TP1 g2 n2 b32"} <= set(labels)
    assert report["recommended"]["label"] == labels[0]
    assert (tmp_path / "plan" / "ratio.png").read_bytes().startswith(b"\x89PNG")
    cfg = load_config(config)
    best = report["recommended"]["layout"]
    assert (cfg.parallel.tensor_parallel, cfg.parallel.attention_workers, cfg.scheduler.micro_batches,
            cfg.scheduler.max_batch_size) == (best["tp"], best["attention_workers"], best["micro_batches"],
                                              best["max_batch_size"])
    assert "synthetic" in config.read_text()


@needs_traces
def test_plan_simulate_predicts_a_config(tmp_path, capsys):
    out = tmp_path / "prediction.json"
    code = plan([
        "simulate", "--config", str(ROOT / "configs" / "gpu-disaggregated.yaml"), "--model", "llama3-8b",
        "--synthetic", "--model-device", "H100", "--attention-device", "H20", "--trace", str(AZURE_CONV),
        "--requests", "50", "--rate-scale", "2", "--kv-blocks", "20000", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["completed"] == report["requests"] == 50 and report["num_blocks"] == 20000
    assert report["label"] == "1xH100 + 2xH20 TP1 g1 n2 b256"
    assert 0 < report["tpot_s"]["p50"] <= report["tpot_s"]["p99"]
    assert report["output_throughput_tok_s"] > 0
    assert plan(["simulate", "--config", str(ROOT / "configs" / "gpu-colocated.yaml"),
                             "--model", "llama3-8b", "--trace", str(AZURE_CONV)]) == 2  # no costs given
    assert "no cost table for device H100" in capsys.readouterr().err


def test_plan_search_prices_the_prefix_cache_and_compares_it(tmp_path, capsys):
    """On a Mooncake-like trace (12 shared documents, round robin) whose prefixes only two
    small attention workers' pool holds, the cache turns the ranking around: with it the
    layout with two attention workers is recommended over the colocated baseline, whose small
    cache (24 GB beside the weights) holds none of them; the report shows both layouts with
    the cache off and on. With --no-prefix-caching the colocated layout is recommended."""
    prices = tmp_path / "prices.yaml"
    prices.write_text("devices:\n"
                      "  FAST: {price_per_hour: 9.0, tflops: 989, memory_gb: 24, bandwidth_tbs: 3.35, nvlink_gbs: 450}\n"
                      "  SMALL: {price_per_hour: 1.0, tflops: 989, memory_gb: 4, bandwidth_tbs: 3.35, nvlink_gbs: 450}\n")
    trace = tmp_path / "shared.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": 100 * i, "input_length": 2560, "output_length": 16,
                                         "hash_ids": [*range(4 * (i % 12), 4 * (i % 12) + 4), 10_000 + i]}) + "\n"
                             for i in range(128)))

    def search(*flags: str) -> tuple[dict, str]:
        out = tmp_path / "-".join(flags or ("default",))
        code = plan(["search", "--model", "llama3-8b", "--synthetic", "--prices", str(prices), "--trace", str(trace),
                     "--requests", "128", "--slo-tpot", "1", "--tp", "1", "--model-devices", "FAST",
                     "--attention-devices", "SMALL", "--attention-workers", "1,2", "--micro-batches", "2",
                     "--batch-caps", "4", "--out-dir", str(out), "--config-out", str(out / "plan.yaml"), *flags])
        printed = capsys.readouterr().out
        assert code == 0, printed
        return json.loads((out / "ranking.json").read_text()), printed

    report, printed = search()
    assert report["prefix_caching"] and "prefix cache on: hits from the trace's hash_ids" in printed
    assert report["recommended"]["layout"]["attention_workers"] == 2
    rows = {(row["role"], row["cache"]): row for row in report["prefix_cache_comparison"]}
    assert list(rows) == [("recommended", "off"), ("recommended", "on"),
                          ("colocated baseline", "off"), ("colocated baseline", "on")]
    assert rows["recommended", "on"]["label"] == report["recommended"]["label"]
    assert rows["recommended", "on"]["prefix_hit_rate"] > 0.6 > 0.1 > rows["colocated baseline", "on"]["prefix_hit_rate"]
    per_dollar = {key: row["tokens_per_dollar"] for key, row in rows.items()}
    assert per_dollar["recommended", "off"] < per_dollar["colocated baseline", "off"]
    assert per_dollar["recommended", "on"] > per_dollar["colocated baseline", "on"]
    assert per_dollar["recommended", "on"] > per_dollar["recommended", "off"]
    assert "recommended vs colocated baseline, tokens per dollar, cache on: +" in printed

    report, printed = search("--no-prefix-caching")
    assert not report["prefix_caching"] and "prefix cache off (--no-prefix-caching)" in printed
    assert report["recommended"]["layout"]["attention_workers"] == 0
    assert all(c["prefix_hit_rate"] is None for c in report["ranking"])
    assert [(row["role"], row["cache"]) for row in report["prefix_cache_comparison"]] == [
        ("recommended", "off"), ("recommended", "on")]  # the colocated baseline is the recommended layout

    report, printed = search("--host-cache-gib", "4")
    assert "+ 4 GiB host tier per KV rank" in printed and report["host_cache_gib"] == 4
    assert [row["cache"] for row in report["prefix_cache_comparison"]][:3] == ["off", "on", "on + 4 GiB host"]
    planned = tmp_path / "--host-cache-gib-4" / "plan.yaml"  # the config runs the host tier it was priced with
    assert load_config(planned).kv_cache.host_cache_gib == 4 and "Prefix cache: priced on" in planned.read_text()


def test_profile_measures_a_cost_table_on_this_cpu(tmp_path, profile):
    out = tmp_path / "cpu.json"
    code, printed, errors = profile(
        "--model", "tiny", "--batches", "1,8", "--contexts", "16,64", "--prefill", "0+16,16+16",
        "--message-bytes", "256,65536", "--warmup", "1", "--repeats", "2", "--threads", "1", "--out", str(out))
    assert code == 0, printed + errors
    table = CostTable.load(out)
    assert table.device == "CPU" and table.source.startswith("measured on") and not table.synthetic
    assert table.shape == PRESETS["tiny"] and table.tp_sizes() == [1]
    assert table.attention_decode.batch == [1.0, 8.0] and table.network.x == [256.0, 65536.0]
    assert all(t >= 0 for t in table.model_layer[1].y + table.step_overhead[1].y)
    assert min(table.attention_decode.seconds[0] + table.network.y) > 0
    # The simulator runs on it.
    layout = Layout("CPU", 1, "CPU", 2, 1, 2, 8, 64, 4)
    result = simulate([TraceRequest(0.1 * i, 20, 10) for i in range(10)], layout, PRESETS["tiny"], table, table, 64)
    assert result.completed == 10 and result.tpot_s["p50"] > 0


def test_profile_emulates_tp_on_one_cpu(tmp_path, profile):
    """--emulate-tp: TP 2 measured as rank 0's shard in this one process, the collectives added
    from the datasheet, and the table says so; the planner loads it and searches TP 2."""
    out = tmp_path / "emulated.json"
    code, printed, errors = profile(
        "--model", "tiny", "--emulate-tp", "--tp", "1,2", "--tp-link", "H100", "--batches", "1,8",
        "--contexts", "16,64", "--prefill", "0+16", "--message-bytes", "256,65536", "--warmup", "1",
        "--repeats", "2", "--threads", "1", "--out", str(out))
    assert code == 0, printed + errors
    assert "TP 2 emulated on one device" in printed
    table = CostTable.load(out)
    assert table.tp_sizes() == [1, 2] and not table.synthetic and table.shape == PRESETS["tiny"]
    assert table.source.startswith("measured on") and "TP 2 emulated on one device" in table.source
    assert "H100 NVLink 450 GB/s" in table.source and "not measured" in table.source
    emulated = table.meta["emulated_tp"]
    assert list(emulated) == ["2"]  # TP 1 is measured as it is
    e = emulated["2"]
    assert "2 query heads, 1 KV heads, MLP intermediate 64" in e["measured"] and e["nvlink_gbs"] == 450
    # measured + added = the table's curve; the added all-reduces match synthetic.py's ring
    from megatron_lamina.planner.synthetic import ring_all_reduce_s
    for i, tokens in enumerate([1, 8]):
        added = 2 * ring_all_reduce_s(tokens * 64 * 4, 2, 450)
        assert abs(e["added_per_layer_s"][i] - added) < 1e-12
        assert abs(table.model_layer[2].y[i] - (e["measured_model_layer_s"][i] + added)) < 1e-12
        assert table.step_overhead[2].y[i] > e["measured_step_overhead_s"][i]
    # The planner uses it: a colocated TP 2 layout simulates
    layout = Layout("CPU", 2, None, 0, 1, 1, 8, 64, 4)
    result = simulate([TraceRequest(0.1 * i, 20, 10) for i in range(10)], layout, PRESETS["tiny"], table, table, 64)
    assert result.completed == 10 and result.tpot_s["p50"] > 0


def test_tp_shard_is_a_ranks_gemm_shapes():
    s = PRESETS["llama3-70b"].tp_shard(8)
    assert (s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size) == (8192, 8, 1, 128, 3584)
    assert s.vocab_size == PRESETS["llama3-70b"].padded_vocab(8) // 8 == 128256 // 8  # the engine pads to 8
    assert PRESETS["llama3-8b"].tp_shard(1) == PRESETS["llama3-8b"]
    with pytest.raises(ValueError, match="does not divide"):
        PRESETS["llama3-8b"].tp_shard(16)


def test_profile_graphs_flag_is_cuda_only(tmp_path, capsys):
    """--graphs (model worker stages from CUDA graphs) on CPU is a clear error (capturing needs
    a GPU: tests/test_gpu.py runs StageGraphs)."""
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit) as done:
        cost_profile.main(["--graphs", "--out", str(out)])
    assert done.value.code == 2 and "--graphs: CUDA graphs need a GPU (--device cuda)" in capsys.readouterr().err
    assert not out.exists()


def test_profile_merges_model_curves_into_a_table(tmp_path, profile):
    """--parts model --merge-into: the model curves re-measured, attention and network kept."""
    from megatron_lamina.planner.cost_table import Curve, Grid

    flat = Curve([1.0, 8.0], [1.0, 1.0])
    base = CostTable("CPU", "measured on an earlier run", PRESETS["tiny"], "float32", {1: flat, 2: flat},
                     {1: flat, 2: flat}, Grid([1.0], [16.0], [[0.5]]), Curve([10.0], [0.25]), Curve([256.0], [0.125]),
                     {"attention": "reference", "network_backend": "gloo"})
    base.save(tmp_path / "base.json")
    out = tmp_path / "merged.json"
    code, printed, errors = profile(
        "--model", "tiny", "--parts", "model", "--batches", "1,8", "--warmup", "1", "--repeats", "2",
        "--threads", "1", "--merge-into", str(tmp_path / "base.json"), "--out", str(out))
    assert code == 0, printed + errors
    table = CostTable.load(out)
    assert table.source.startswith("measured on") and "measured on an earlier run" in table.source
    assert table.tp_sizes() == [1, 2] and table.model_layer[2] == flat and table.model_layer[1] != flat
    assert table.attention_decode == base.attention_decode and table.network == base.network
    merged = table.meta["merged_from"]
    assert merged["parts_kept"] == ["attention", "network"] and merged["replaced_model_layer"]["1"]["seconds"] == [1, 1]
    assert table.meta["attention"] == "reference"
    code, _, errors = profile("--model", "llama3-8b", "--parts", "model", "--merge-into", str(tmp_path / "base.json"),
                              "--out", str(tmp_path / "x.json"))
    assert code == 2 and "its shape is" in errors
