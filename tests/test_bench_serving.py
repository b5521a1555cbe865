"""tools/bench_serving.py against the real server: a slice of a real trace, every request
accounted for.

torchrun, 2 ranks (1 model worker, 1 attention worker, 2 micro-batches), the tiny model, the
first 20 requests of the Azure conversation trace with lengths clipped to the tiny model's
256-token context, replayed six times as fast as the trace's arrival times (about 2 s of arrivals,
13 s in the trace: the server queues and batches them). The traces live
in the project's shared folder: ../shared/traces relative to the repository root (CI copies
shared/ beside the clone).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import httpx
import pytest
from server_proc import ServerProcess, tiny_server_config

from megatron_lamina.planner.trace import read_trace

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
AZURE_CONV = TRACES / "AzureLLMInferenceTrace_conv.csv"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not AZURE_CONV.is_file(),
                    reason=f"no request traces at {TRACES} (CI copies the project's shared/ beside the clone)")
def test_trace_slice_against_the_real_server(tmp_path, tiny_models):
    config, port = tiny_server_config(tmp_path, tiny_models["untied"].canonical_dir,
                                      parallel={"attention_workers": 1},
                                      scheduler={"max_batch_size": 16, "micro_batches": 2,
                                                 "max_prefill_tokens": 64})
    server = ServerProcess(config, port, 2, tmp_path / "server.log")
    out = tmp_path / "bench.json"
    ranks = []
    try:
        server.wait_healthy()
        # torchrun starts its workers in sessions of their own, so killing torchrun's process
        # group (ServerProcess.stop) leaves them running: they are killed by id below.
        ranks = [server.rank_pid(rank) for rank in range(2)]
        code = load_tool("bench_serving").main([
            "--url", server.url, "--trace", str(AZURE_CONV), "--max-requests", "20",
            "--max-input-len", "160", "--max-output-len", "48", "--rate-scale", "6",
            "--slo-ttft", "5", "--slo-tpot", "1", "--timeout", "120", "--out", str(out)])
        # A closed batch on the same server, no trace file: every request at once.
        closed_code = load_tool("bench_serving").main([
            "--url", server.url, "--closed", "12", "--input-len", "30", "--output-len", "9",
            "--timeout", "120", "--out", str(tmp_path / "closed.json")])
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    finally:
        server.stop()
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    report = json.loads(out.read_text())
    failed = [r for r in report["requests"] if not r["ok"]]
    assert code == 0 and not failed, (failed[:3], server.output()[-2000:])
    assert report["sent"] == report["completed"] == 20 and report["failed"] == 0
    assert report["clipped"] == {"input": 17, "output": 14}
    # Exactly the trace's (clipped) output length, every request.
    trace = read_trace(AZURE_CONV, limit=20)
    for record, request in zip(report["requests"], trace):
        assert record["input_len"] == min(request.input_len, 160)
        assert record["output_len"] == min(request.output_len, 48)
        assert record["output_tokens"] == record["output_len"] == len(record["token_times_s"])
        assert record["finish_reason"] == "length"
    assert report["output_tokens"] == sum(r["output_len"] for r in report["requests"])
    assert report["ttft_s"]["count"] == 20 and report["ttft_s"]["p50"] > 0
    assert report["tpot_s"]["p99"] >= report["tpot_s"]["p50"] > 0
    assert 0 < report["goodput"]["requests"] <= 20
    assert report["request_throughput_req_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 1000

    closed = json.loads((tmp_path / "closed.json").read_text())
    assert closed_code == 0 and closed["completed"] == 12 and closed["arrivals"] == "closed batch of 12"
    assert all(r["input_len"] == 30 and r["output_tokens"] == 9 for r in closed["requests"])
    assert closed["output_tokens"] == 12 * 9
    # The engine's steps in /metrics: every generated token came out of a step that sampled it.
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    assert values["lamina_generation_tokens_total"] == report["output_tokens"] + 12 * 9
    assert values["lamina_step_batch_size_sum"] == values["lamina_generation_tokens_total"]
    assert values["lamina_step_seconds_count"] == values["lamina_step_batch_size_count"] > 0
    assert values["lamina_step_tokens_sum"] >= values["lamina_step_batch_size_sum"]


def test_serving_benchmark_runs_a_disaggregated_layout_with_its_ranks(tmp_path):
    """tools/serving_benchmark.py on CPU with a 2-rank layout (1 model worker + 1 attention
    worker): the server and the batch job are started with the config's ranks (it used to start
    one, which the layout check refuses), every request of the closed batch and every prompt of
    the batch job comes back, the engine's and the front end's CPU are read, and no phase reports
    an error."""
    tool = load_tool("serving_benchmark")
    out = tmp_path / "out"
    assert tool.main(["--device", "cpu", "--shape", "tiny", "--dtype", "float32", "--checkpoint", str(tmp_path / "ckpt"),
                      "--config", str(ROOT / "configs" / "default.yaml"), "--set", "runtime.device=cpu",
                      "--set", "parallel.attention_workers=1", "--set", "scheduler.max_batch_size=8",
                      "--closed", "4", "--input-len", "16", "--output-len", "6", "--trace-requests", "0",
                      "--batch-prompts", "3", "--phases", "checkpoint,server,batch", "--greedy-too",
                      "--out-dir", str(out)]) == 0
    result = json.loads((out / "serving_benchmark.json").read_text())
    assert not [k for k in result if k.endswith("_error")], result
    assert result["server"]["ranks"] == 2
    assert result["server"]["closed"]["completed"] == 4 and result["server"]["closed"]["failed"] == 0
    # The headline samples as users do (temperature 1.0, top_p 0.95); the greedy batch ran first.
    assert result["args"]["temperature"] == 1.0 and result["args"]["top_p"] == 0.95
    assert result["server"]["closed_greedy"]["completed"] == 4
    sent = [json.loads(line) for line in (out / "batch-in.jsonl").read_text().splitlines()]
    assert all(r["temperature"] == 1.0 and r["top_p"] == 0.95 for r in sent)
    cpu = result["server"]["closed"]["server_cpu"]  # rank 0 by its RANK, the front end by its log line
    # Both processes were found and read. The front end's share may be 0: /proc counts CPU in
    # 10 ms ticks, and 24 tokens of front-end work can take less than one.
    assert cpu["engine_loop_core_share"] > 0 and cpu["frontend_us_per_token"] is not None
    assert cpu["frontend_us_per_token"] >= 0
    assert result["batch"]["exit_code"] == 0 and result["batch"]["records"] == 3
    assert result["batch"]["tokens"] == 3 * 6


def test_decode_window_reads_the_steps_between_the_last_first_token_and_the_end():
    """bench/decode_window.py on a hand-made closed batch: the window runs from the last first
    token to the last token, steps and batch come from the /metrics samples at its edges, and a
    batch where no request completed gives no window (it used to raise on max() of nothing)."""
    from megatron_lamina.bench.decode_window import decode_window

    report = {"t0_monotonic": 100.0, "requests": [
        {"ok": True, "input_len": 10, "token_times_s": [1.0, 2.0, 3.0, 4.0]},
        {"ok": True, "input_len": 20, "token_times_s": [2.0, 3.0, 4.0]},
        {"ok": False, "input_len": 99, "token_times_s": [0.5]}]}
    sample = {"lamina_step_seconds_count": 0, "lamina_step_batch_size_sum": 0, "lamina_generation_tokens_total": 0,
              "lamina_gpu_busy_seconds_total": 0.0, "lamina_gpu_period_seconds_total": 0.0}
    later = {"lamina_step_seconds_count": 4, "lamina_step_batch_size_sum": 8, "lamina_generation_tokens_total": 8,
             "lamina_gpu_busy_seconds_total": 1.5, "lamina_gpu_period_seconds_total": 2.0}
    window = decode_window(report, [(101.0, {**sample, "lamina_step_seconds_count": 9}), (102.0, sample),
                                    (104.0, later), (105.0, later)], [(102.5, 0.5), (103.5, 1.0), (110.0, 0.0)])
    assert (window["start_s"], window["end_s"], window["duration_s"]) == (2.0, 4.0, 2.0)
    # Rows sampled after the window opened: tokens 2 and 3 of the first request (contexts 12,
    # 13), tokens 1 and 2 of the second (21, 22).
    assert window["tokens"] == 4 and window["mean_context"] == (12 + 13 + 21 + 22) / 4
    assert window["steps"] == 4 and window["mean_step_s"] == 0.5 and window["mean_batch"] == 2
    assert window["gpu_busy_events"] == 0.75 and window["gpu_util_nvml"] == 0.75
    assert decode_window({"t0_monotonic": 0.0, "requests": [{"ok": False, "token_times_s": []}]}, [], []) == {}
