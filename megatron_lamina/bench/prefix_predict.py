"""The prefix-cache benchmark predicted on the CPU: bench/prefix_replay.py's replay run through
the planner's simulator (planner/simulator.py, the engine's own scheduler and block manager
on a clock priced by a measured cost table). The program of tools/predict_prefix_cache.py.

    python tools/predict_prefix_cache.py --costs configs/planner/costs/h200-llama3-8b-tp1-graphs.json \
        --traces conversation --modes off,on,host --skip 6000 --warmup 250 --requests 200 \
        --set kv_cache.num_blocks=20000 --host-cache-gib 64

It takes the benchmark's own window arguments (prefix_replay.add_window_arguments) and
server config (--config with the benchmark's overrides, then --set), and for each trace and
mode simulates what the benchmark sends (prefix_trace.replay_window): with the cache on, the
warm-up all at once, one output token each; then the window's Poisson arrivals, after the
warm-up has finished (the simulator's clock jumps over the gap, as the replay waits for the
warm-up's last response). It reports the window's hit rate, TTFT p50/p90 and duration, the
warm-up's seconds (what the device call spends on it), and the same LRU bounds the benchmark
prints. The KV blocks are the config's `kv_cache.num_blocks` (else the planner's estimate for
the table's device), the host tier `host_cache_gib` over the table's bytes per block. Writes
--out (JSON) and prints a table. Where the simulator errs: it prices steps from the table
only (no HTTP, no host-tier copies), and a table of another device than the run's errs by
that device's speed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_lamina.bench.prefix_replay import (
    BENCH_OVERRIDES, add_window_arguments, check_window_arguments, trace_path,
)
from megatron_lamina.bench.prefix_trace import replay_window, window_bounds
from megatron_lamina.config import load_config
from megatron_lamina.planner.cost_table import CostTable
from megatron_lamina.planner.devices import load_prices
from megatron_lamina.planner.layout import Layout, host_blocks_per_cache, kv_blocks_per_cache
from megatron_lamina.planner.simulator import EngineSimulator, StepCostModel
from megatron_lamina.planner.stats import summarize
from megatron_lamina.planner.trace import TraceRequest

WINDOW_AFTER_S = 1e6  # simulated seconds: past any warm-up's end (asserted), and idle time changes no state

def cost_model(args) -> tuple[StepCostModel, int, int]:
    """The benchmark server's layout priced by --costs: (costs, device blocks, host-tier blocks)."""
    cfg = load_config(args.config, [*BENCH_OVERRIDES, *args.set])
    if not cfg.colocated:
        raise ValueError(f"--config {args.config}: the prediction is of one colocated server (the benchmark's); "
                         "parallel.attention_workers must be 0")
    table = CostTable.load(args.costs)
    p, s, kv = cfg.parallel, cfg.scheduler, cfg.kv_cache
    layout = Layout(table.device, p.tensor_parallel, None, 0, 1, s.micro_batches, s.max_batch_size,
                    s.max_prefill_tokens, kv.block_size, kv.dtype)
    layout.check(table.shape)
    blocks = kv.num_blocks if kv.num_blocks != "auto" else \
        kv_blocks_per_cache(layout, table.shape, load_prices()[0], table.dtype_bytes)
    host = host_blocks_per_cache(layout, table.shape, args.host_cache_gib, table.dtype_bytes)
    return StepCostModel(layout, table.shape, table, table), blocks, host


def predict_mode(costs: StepCostModel, blocks: int, host: int, mode: str, warm: list[TraceRequest],
                 window: list[TraceRequest]) -> dict:
    """One mode's replay (module docstring): the window's figures and the warm-up's seconds."""
    warm = warm if mode != "off" else []
    # The window starts once the warm-up is done: its arrivals are moved past the warm-up's end.
    gap = WINDOW_AFTER_S if warm else 0.0
    shifted = [TraceRequest(gap + r.arrival_s, r.input_len, r.output_len, r.hash_ids) for r in window]
    sim = EngineSimulator(costs, blocks, prefix_caching=mode != "off", host_blocks=host if mode == "host" else 0)
    result = sim.run(warm + shifted)
    warm_ttft = [t for t in result.ttft_by_request[:len(warm)] if t is not None]
    ttft, cached = result.ttft_by_request[len(warm):], result.cached_by_request[len(warm):]
    assert not warm_ttft or max(warm_ttft) < gap, "the warm-up outlasted the gap before the window"
    start = shifted[0].arrival_s
    return {"mode": mode, "hit_rate": sum(cached) / sum(r.input_len for r in window),
            "ttft_s": summarize([t for t in ttft if t is not None]),
            "window_s": max(r.arrival_s + t for r, t in zip(shifted, ttft) if t is not None) - start,
            "warmup_s": max(warm_ttft) if warm_ttft else None, "preemptions": result.preemptions,
            "capacity_tokens": (blocks + (host if mode == "host" else 0)) * costs.layout.block_size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--costs", required=True, help="a cost table of the benchmark's shape (configs/planner/costs/)")
    p.add_argument("--out", default=None, help="write the prediction JSON here too")
    add_window_arguments(p)
    args = p.parse_args(argv)
    check_window_arguments(p, args)
    try:
        costs, blocks, host = cost_model(args)
    except (ValueError, OSError) as e:
        p.error(str(e))
    rows = []
    for name in args.traces:
        path = trace_path(args, name)
        warm, window = replay_window(path, args.skip, args.warmup, args.requests, args.rate, args.seed,
                                     args.max_input_len, args.max_output_len)
        for mode in args.modes.split(","):
            row = {"trace": name, **predict_mode(costs, blocks, host, mode, warm, window)}
            row["bound"] = window_bounds(path, warm if mode != "off" else [], window, args.skip,
                                         row["capacity_tokens"], args.max_input_len)
            rows.append(row)
    report = {"costs": args.costs, "device": costs.layout.model_device, "device_blocks": blocks, "host_blocks": host,
              "args": {k: v for k, v in vars(args).items() if k != "traces_dir"}, "predicted": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    print(f"predicted on the {report['device']} cost table ({report['costs']}): {report['device_blocks']} device "
          f"blocks, {report['host_blocks']} host-tier blocks")
    print(f"{'trace':<13} {'cache':<5} {'hit rate':>8}  {'LRU bound: capacity / unlimited / whole history':>47}  "
          f"{'TTFT p50 / p90 (s)':>18}  {'of off p50':>10}  {'window (s)':>10}  {'warm-up (s)':>11}  {'preempted':>9}")
    off = {r["trace"]: r["ttft_s"]["p50"] for r in report["predicted"] if r["mode"] == "off"}
    for r in report["predicted"]:
        bound = " / ".join(f"{r['bound'][k]:.3f}" for k in ("at_capacity", "unlimited", "whole_history_unlimited"))
        ttft = f"{r['ttft_s']['p50']:.3f} / {r['ttft_s']['p90']:.3f}"
        ratio = f"{r['ttft_s']['p50'] / off[r['trace']]:.2f}" if r["trace"] in off else "-"
        warm = "-" if r["warmup_s"] is None else f"{r['warmup_s']:.0f}"
        print(f"{r['trace']:<13} {r['mode']:<5} {r['hit_rate']:>8.3f}  {bound:>47}  {ttft:>18}  {ratio:>10}  "
              f"{r['window_s']:>10.0f}  {warm:>11}  {r['preemptions']:>9}")
