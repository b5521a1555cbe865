"""The planner's device validation (issue 6): simulator prediction vs the real server, colocated,
one device; the orchestration behind tools/validate_planner.py.

    # on a GPU machine: everything, a table last
    python tools/validate_planner.py --device cuda --out-dir out/validate
    # on the CPU, tiny shape and a few requests per trace (what tests/test_validate_planner.py runs)
    python tools/validate_planner.py --device cpu --shape tiny --slice azure configs/planner/traces/azure-conv-slice.csv 6 8 ...

Steps, each with the project's own tools:
  1. a random-weight checkpoint of --shape (checkpoint/random_weights.py, tools/random_checkpoint.py's
     program; --checkpoint reuses one);
  2. its cost table on this device, TP 1, grids sized for the slices: model up to the prefill
     budget in tokens, attention up to the batch cap and the slices' longest context
     (tools/profile_costs.py; --costs reuses one);
  3. the real server (torchrun launcher/serve.py, colocated TP 1, CUDA graphs on a GPU as the
     profile's --graphs model curves (--eager: neither), a fixed `kv_cache.num_blocks` so that
     the simulator gets the same capacity), and against it, with tools/bench_serving.py:
     a. calibration: the incremental detokenizer timed on the checkpoint's tokenizer (a
        constant per token: nothing the server does grows with the output any more), then
        closed batches of --calibration-batches requests (--calibration-prompt prompt and
        --calibration-output output tokens, all sent at once): their pure-decode steps,
        against the cost table's step, give the serving overhead the profile does not contain
        (planner/serving_overhead.py: scheduling, plan broadcast, inputs, sampling read-back,
        detokenization, streaming, less what asynchronous scheduling overlaps);
     b. each --slice NAME TRACE REQUESTS RATE_SCALE: the first REQUESTS of TRACE (after
        --skip), arrivals RATE_SCALE times faster, lengths clipped to --max-input-len /
        --max-output-len, token-id prompts and exact output lengths;
  4. the simulator on exactly the same requests (same slice, clipping, rate scale, seed, batch
     cap, micro-batches, prefill budget, block size, KV blocks), once with the cost table
     alone and once with the fitted serving overhead added to every step (its constant to the
     pure-decode steps only when the server runs CUDA graphs: planner/serving_overhead.py);
  5. per slice: measured vs predicted request and output-token throughput (completed requests
     over first send .. last token, the same window in both), TPOT mean/p50/p90 ((last token -
     first token) / (output tokens - 1) per request, both sides), TTFT p50 (information
     only), relative errors, and whether each is within --tolerance (the issue's 15 %).
Writes OUT_DIR/validation.json (everything, with the overhead fit), validation.png, costs.json,
bench-NAME.json per slice and server.log. The default slices are committed excerpts of the
shared traces (configs/planner/traces/README.md). --budget-s stops the server (failing what
is in flight, every request still accounted for) if the run would outlive the device's limit.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/ and tools/

from megatron_lamina.bench import serving_replay
from megatron_lamina.bench.server_job import MetricsPoller, ServerJob, free_port
from megatron_lamina.checkpoint.random_weights import write_random_checkpoint
from megatron_lamina.config import load_config
from megatron_lamina.planner.cost_table import CostTable
from megatron_lamina.planner.layout import Layout
from megatron_lamina.planner.serving_overhead import (
    ServingOverhead,
    decode_step_samples,
    fit,
    measure_detokenization,
    serving_simulator,
)
from megatron_lamina.planner.shapes import load_shape
from megatron_lamina.planner.simulator import StepCostModel
from megatron_lamina.planner.trace import read_trace, select

TRACES = ROOT / "configs" / "planner" / "traces"
DEFAULT_SLICES = [("azure", str(TRACES / "azure-conv-slice.csv"), "400", "2"),
                  ("mooncake", str(TRACES / "mooncake-conv-slice.jsonl"), "200", "1.5")]
TARGETS = ("request_throughput", "output_throughput", "tpot_mean", "tpot_p50", "tpot_p90")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_tool(cmd: list[str], log_path: Path) -> None:
    log(" ".join(cmd[1:]))
    with open(log_path, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        raise RuntimeError(f"{cmd[1]} exited {code}:\n{log_path.read_text()[-3000:]}")


GAUGES = {"lamina_requests_running": "running", "lamina_requests_waiting": "waiting",
          "lamina_kv_blocks_used": "kv_blocks_used"}


def gauge_summary(samples: list[tuple[float, dict]]) -> dict:
    """The server's gauges (running and waiting requests, KV blocks used) sampled once a second
    during a slice: a diagnostic beside the client's numbers (is a TPOT error the batch size or
    the step time?). Time averages over the samples; the simulator's `mean_batch` is a per-step
    average, so the two are comparable only roughly."""
    sums = []
    for _, metrics in samples:
        sample = {}
        for name, value in metrics.items():
            key = GAUGES.get(name.split("{")[0])
            if key:
                sample[key] = sample.get(key, 0.0) + value
        sums.append(sample)
    busy = [x for x in sums if x.get("running", 0) + x.get("waiting", 0) > 0]
    out = {"samples": len(sums), "busy_samples": len(busy)}
    for key in GAUGES.values():
        values = [x.get(key, 0.0) for x in busy]
        out[f"{key}_mean"] = sum(values) / len(values) if values else None
        out[f"{key}_max"] = max(values, default=None)
    return out


def bench(url: str, trace: Path, requests: int, rate_scale: float, args, out: Path, plot_path: Path,
          max_input_len: int | None, max_output_len: int | None) -> dict:
    argv = ["--url", url, "--trace", str(trace), "--skip", str(args.skip), "--max-requests", str(requests),
            "--rate-scale", str(rate_scale), "--seed", str(args.seed), "--timeout", "600",
            "--out", str(out), "--plot", str(plot_path)]
    if max_input_len:
        argv += ["--max-input-len", str(max_input_len)]
    if max_output_len:
        argv += ["--max-output-len", str(max_output_len)]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            serving_replay.main(argv)
    except ImportError as e:  # no matplotlib: the JSON is written before the plot
        log(f"bench_serving: no plot ({e})")
    report = json.loads(out.read_text())
    assert report["sent"] == report["completed"] + report["failed"]
    return report


# ------------------------------------------------------------------------- the profile

def _grid(points: list[int], top: int) -> str:
    return ",".join(str(p) for p in sorted({p for p in points if p < top} | {top}))


def profile_command(args, shape_name: str, out: Path, cap: int, prefill: int, max_context: int) -> list[str]:
    """tools/profile_costs.py for TP 1 with grids that cover the slices: the model and the sampler up to
    a full prefill step plus the batch (tokens), attention up to the batch cap and the longest
    context, prefill chunks up to the budget (and chunked continuations). On the CPU one thread,
    as the server's rank gets (OMP_NUM_THREADS=1), and the profiler's default layers and repeats."""
    tokens = prefill + cap
    prefill_points = [(0, n) for n in (16, 64, 256, 1024, 2048, 4096, 8192) if n < prefill] + [(0, prefill)]
    prefill_points += [(prefill // 2, prefill // 2), (prefill // 4, 3 * prefill // 4)]
    if max_context > prefill:
        prefill_points.append((max_context - prefill, prefill))
    graphs = ["--graphs", "--graph-max-batch", str(tokens)] if args.device == "cuda" and not args.eager else []
    return [sys.executable, str(ROOT / "tools" / "profile_costs.py"), "--model", shape_name, "--device", args.device,
            "--dtype", args.dtype, "--tp", "1",
            "--batches", _grid([1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192], tokens),
            "--attention-batches", _grid([1, 4, 8, 16, 32, 64, 128, 256, 512], cap),
            "--contexts", _grid([16, 64, 256, 1024, 2048, 4096, 8192, 16384], max_context),
            "--prefill", ",".join(f"{s}+{n}" for s, n in sorted(set(prefill_points)) if n > 0),
            "--message-bytes", "1024,65536", "--out", str(out)] + (
            # On a GPU: 1 and 9 layers, so that the per-layer time (the difference / 8, paid 32
            # times a step) is not a small difference of noisy numbers; more repeats.
            ["--layers", "1,9", "--warmup", "3", "--repeats", "9"] if args.device == "cuda" else ["--threads", "1"]
    ) + graphs


# ------------------------------------------------------------------------- comparison

def measured_metrics(report: dict) -> dict:
    return {"request_throughput": report["request_throughput_req_s"],
            "output_throughput": report["output_throughput_tok_s"],
            "tpot_mean": report["tpot_s"]["mean"], "tpot_p50": report["tpot_s"]["p50"],
            "tpot_p90": report["tpot_s"]["p90"], "ttft_p50": report["ttft_s"]["p50"],
            "e2e_p50": report["e2e_s"]["p50"]}


def predicted_metrics(result) -> dict:
    return {"request_throughput": result.request_throughput, "output_throughput": result.output_throughput,
            "tpot_mean": result.tpot_s["mean"], "tpot_p50": result.tpot_s["p50"], "tpot_p90": result.tpot_s["p90"],
            "ttft_p50": result.ttft_s["p50"], "e2e_p50": result.e2e_s["p50"]}


def relative_errors(measured: dict, predicted: dict) -> dict:
    def err(m, p):
        return None if m in (None, 0) or p is None or (isinstance(m, float) and math.isnan(m)) else (p - m) / m

    return {k: err(measured[k], predicted[k]) for k in measured}


UNITS = {"request_throughput": ("req/s", 1), "output_throughput": ("tok/s", 1), "tpot_mean": ("ms", 1e3),
         "tpot_p50": ("ms", 1e3), "tpot_p90": ("ms", 1e3), "ttft_p50": ("ms", 1e3), "e2e_p50": ("s", 1)}


def print_table(slices: list[dict], tolerance: float) -> None:
    def fmt(v, scale):
        return "-" if v is None else f"{v * scale:.4g}"

    def pct(e):
        return "-" if e is None else f"{e * 100:+.1f}%"

    head = (f"{'slice':<10} {'metric':<20} {'measured':>10} {'predicted':>10} {'error':>8}  "
            f"{'profile only':>12} {'error':>8}  within {tolerance * 100:.0f}%")
    print(head)
    print("-" * len(head))
    for s in slices:
        for k, (unit, scale) in UNITS.items():
            m, full, raw = s["measured"][k], s["predicted"][k], s["predicted_profile_only"][k]
            e, e_raw = s["error"][k], s["error_profile_only"][k]
            flag = ("yes" if e is not None and abs(e) <= tolerance else "NO") if k in TARGETS else "(info)"
            print(f"{s['name']:<10} {k + ' (' + unit + ')':<20} {fmt(m, scale):>10} {fmt(full, scale):>10} "
                  f"{pct(e):>8}  {fmt(raw, scale):>12} {pct(e_raw):>8}  {flag}")


def plot(slices: list[dict], path: Path, tolerance: float, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(TARGETS) + ["ttft_p50"]
    fig, axes = plt.subplots(1, len(slices), figsize=(6 * len(slices), 4), squeeze=False)
    for ax, s in zip(axes[0], slices):
        xs = range(len(keys))
        for offset, (label, errors) in enumerate((("profile + serving overhead", s["error"]),
                                                  ("profile only", s["error_profile_only"]))):
            ax.bar([x + 0.4 * offset - 0.2 for x in xs], [100 * (errors[k] or 0) for k in keys], width=0.4,
                   label=label)
        ax.axhspan(-100 * tolerance, 100 * tolerance, color="green", alpha=0.1)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(list(xs), keys, rotation=30, fontsize=8)
        ax.set_ylabel("predicted vs measured (%)")
        ax.set_title(f"{s['name']}: {s['requests']} requests, x{s['rate_scale']:g}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------- main

def validate(args) -> int:
    """Steps 1-5 of the module's docstring, as the parsed `args` say; 0 when every slice completed."""
    started = time.monotonic()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="validate-planner-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = load_shape(args.shape)
    slices = []
    for name, trace, requests, rate_scale in args.slices:
        chosen, clipping = select(read_trace(trace, limit=requests, skip=args.skip), rate_scale=rate_scale,
                                  seed=args.seed, max_input_len=args.max_input_len,
                                  max_output_len=args.max_output_len)
        slices.append({"name": name, "trace": str(trace), "skip": args.skip, "requests": len(chosen),
                       "rate_scale": rate_scale, "clipped": vars(clipping), "_requests": chosen})
    max_context = max(r.input_len + r.output_len for s in slices for r in s["_requests"])
    max_context = max(max_context, args.calibration_prompt + args.calibration_output)

    # 1. checkpoint
    checkpoint = Path(args.checkpoint) if args.checkpoint else work / f"random-{shape.name}"
    if not args.checkpoint:
        log(f"random checkpoint of {shape.name} ({args.dtype}, drawn on {args.device}): {checkpoint}")
        write_random_checkpoint(checkpoint, shape.name, args.dtype, args.device, overwrite=True)
        if args.device == "cuda":  # the server starts on this GPU next: give back what the drawing cached
            import torch

            torch.cuda.empty_cache()
    # 2. cost table
    costs_path = out / "costs.json"
    if args.costs:
        costs_path.write_text(Path(args.costs).read_text())
    else:
        run_tool(profile_command(args, shape.name, costs_path, args.max_batch_size, args.max_prefill_tokens,
                                 max_context), work / "profile.log")
    table = CostTable.load(costs_path)
    if table.shape != shape:
        raise SystemExit(f"error: {costs_path} is for shape {table.shape.name}, not {shape.name}")
    log(f"costs: {table.source}")

    # 3. the server's detokenization cost, then the server, calibration and the slices
    graphs = args.device == "cuda" and not args.eager
    detokenize_s = measure_detokenization(checkpoint)
    log(f"detokenization: {detokenize_s * 1e6:.3f} us per token (per row and step, whatever the output length)")
    port = free_port()
    overrides = [f"model.checkpoint={checkpoint}", f"model.dtype={args.dtype}", "parallel.tensor_parallel=1",
                 "parallel.attention_workers=0", "parallel.attention_head_groups=1",
                 f"runtime.device={args.device}", f"runtime.cuda_graphs={str(graphs).lower()}",
                 f"scheduler.max_batch_size={args.max_batch_size}", f"scheduler.micro_batches={args.micro_batches}",
                 f"scheduler.max_prefill_tokens={args.max_prefill_tokens}",
                 f"kv_cache.block_size={args.block_size}", f"kv_cache.num_blocks={args.kv_blocks}",
                 ]
    cfg = load_config(args.config, overrides)
    s = cfg.scheduler
    layout = Layout(table.device, 1, None, 0, 1, s.micro_batches, s.max_batch_size, s.max_prefill_tokens,
                    cfg.kv_cache.block_size)
    base_costs = StepCostModel(layout, shape, table, table)
    log(f"server: {args.config} {' '.join(overrides)}")
    server = ServerJob(overrides, args.config, port, out / "server.log", cpu=args.device == "cpu")
    watchdog = threading.Timer(max(1.0, args.budget_s - (time.monotonic() - started)), server.kill)
    watchdog.daemon = True
    watchdog.start()
    calibration, samples = [], []
    try:
        server.wait_healthy(timeout=max(30.0, args.budget_s - (time.monotonic() - started)))
        log(f"server healthy at {server.url} ({time.monotonic() - started:.0f} s)")
        for batch in args.calibration_batches:
            trace = work / f"calibration-{batch}.jsonl"
            trace.write_text("".join(json.dumps({"timestamp": 0, "input_length": args.calibration_prompt,
                                                 "output_length": args.calibration_output}) + "\n"
                                     for _ in range(batch)))
            report = bench(server.url, trace, batch, 1.0, argparse.Namespace(skip=0, seed=args.seed),
                           work / f"bench-calibration-{batch}.json", work / f"bench-calibration-{batch}.png",
                           None, None)
            got = decode_step_samples(report["requests"], args.calibration_prompt, base_costs)
            samples += got
            residual = sorted(r for _, _, r in got)
            calibration.append({"batch": batch, "completed": report["completed"], "failed": report["failed"],
                                "tpot_p50_s": report["tpot_s"]["p50"], "steps": len(got),
                                "residual_median_s": residual[len(residual) // 2] if residual else None})
            log(f"calibration batch {batch}: TPOT p50 {report['tpot_s']['p50']}, "
                f"median residual over the cost table {calibration[-1]['residual_median_s']}")
        for sl in slices:
            log(f"slice {sl['name']}: {sl['requests']} requests x{sl['rate_scale']:g} ({sl['trace']})")
            poller = MetricsPoller(server.url)
            try:
                report = bench(server.url, Path(sl["trace"]), sl["requests"], sl["rate_scale"],
                               args, out / f"bench-{sl['name']}.json", work / f"bench-{sl['name']}.png",
                               args.max_input_len, args.max_output_len)
            finally:
                gauges = gauge_summary(poller.stop())
            sl.update(sent=report["sent"], completed=report["completed"], failed=report["failed"],
                      failures=report["failures"], measured=measured_metrics(report),
                      measured_duration_s=report["duration_s"], server_gauges=gauges)
            log(f"slice {sl['name']}: {report['completed']}/{report['sent']} completed in "
                f"{report['duration_s']:.1f} s, TPOT p50 {report['tpot_s']['p50']}")
    finally:
        watchdog.cancel()
        server.stop()
        log(f"server stopped ({time.monotonic() - started:.0f} s)")

    # 4. the simulator on the same requests
    if samples:
        overhead = fit(samples, f"fitted on {len(samples)} pure-decode steps of closed batches "
                                f"{args.calibration_batches} (prompt {args.calibration_prompt}, output "
                                f"{args.calibration_output}) against this server; no term grows with the output "
                                f"(incremental detokenization, {detokenize_s * 1e6:.2f} us per token, in per_row)"
                                + ("; per_step on pure-decode steps only (whole-step CUDA graphs there, the "
                                   "profile's stage graphs on steps with prefill)" if graphs else ""),
                       per_token_s=0.0, decode_steps_only=graphs)
    else:  # the run stopped before any calibration: both predictions are the profile's
        overhead = ServingOverhead(0.0, 0.0, 0.0, "not measured (no calibration step completed)")
    log(f"serving overhead: {overhead.per_step_s * 1e3:.3f} ms/step + {overhead.per_row_s * 1e6:.1f} us/row "
        f"+ {overhead.per_token_s * 1e6:.3f} us/decoded token")
    for sl in slices:
        requests = sl.pop("_requests")
        for key, extra in (("predicted_profile_only", None), ("predicted", overhead)):
            result = serving_simulator(layout, shape, table, args.kv_blocks, extra).run(requests)
            sl[key] = predicted_metrics(result)
            sl[key + "_detail"] = {k: v for k, v in result.to_dict().items() if k not in ("layout",)}
        if "measured" in sl:
            sl["error"] = relative_errors(sl["measured"], sl["predicted"])
            sl["error_profile_only"] = relative_errors(sl["measured"], sl["predicted_profile_only"])
            sl["within_tolerance"] = all(sl["error"][k] is not None and abs(sl["error"][k]) <= args.tolerance
                                         for k in TARGETS)

    # 5. report
    done = [sl for sl in slices if "measured" in sl]
    report = {"shape": shape.to_dict(), "dtype": args.dtype, "device": args.device, "cost_source": table.source,
              "checkpoint": str(checkpoint), "server_overrides": overrides, "layout": layout.to_dict(),
              "kv_blocks": args.kv_blocks, "cuda_graphs": graphs, "detokenize_s_per_token": detokenize_s,
              "tolerance": args.tolerance,
              "clip": {"max_input_len": args.max_input_len, "max_output_len": args.max_output_len},
              "serving_overhead": overhead.to_dict(), "calibration": calibration,
              "calibration_samples": [list(x) for x in samples], "slices": slices,
              "wall_s": time.monotonic() - started}
    (out / "validation.json").write_text(json.dumps(report, indent=1) + "\n")
    title = (f"{shape.name} {args.dtype} on {table.device}, colocated TP1, {'CUDA graphs' if graphs else 'eager'}, "
             f"b{args.max_batch_size} n{args.micro_batches} prefill {args.max_prefill_tokens}, {args.kv_blocks} KV blocks")
    try:
        plot(done, out / "validation.png", args.tolerance, title)
    except ImportError as e:
        log(f"no plot ({e})")
    log(f"wrote {out / 'validation.json'} ({time.monotonic() - started:.0f} s in all)")
    print(f"\n{title}\ncosts: {table.source}\nserving overhead ({overhead.source}): "
          f"{overhead.per_step_s * 1e3:.3f} ms/step + {overhead.per_row_s * 1e6:.1f} us/row + "
          f"{overhead.per_token_s * 1e6:.3f} us/decoded token")
    for sl in slices:
        if "measured" not in sl:
            print(f"{sl['name']}: not measured (the run stopped first)")
        else:
            g, d = sl["server_gauges"], sl["predicted_detail"]
            print(f"{sl['name']}: {sl['completed']}/{sl['sent']} completed ({sl['failures'] or 'no failures'}), "
                  f"clipped {sl['clipped']}; server while busy: running mean {g['running_mean'] or 0:.1f} "
                  f"max {g['running_max'] or 0:.0f}, waiting max {g['waiting_max'] or 0:.0f}, KV blocks max "
                  f"{g['kv_blocks_used_max'] or 0:.0f}; predicted: {d['completed']} completed, "
                  f"{d['preemptions']} preemptions, batch per step mean {d['mean_batch']:.1f} max {d['max_batch']}")
    print()
    print_table(done, args.tolerance)
    ok = len(done) == len(slices) and all(sl["failed"] == 0 for sl in done)
    return 0 if ok else 1


# --------------------------------------------------------------------- command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--shape", default=None, help="shape preset (default: llama3-8b on cuda, tiny on cpu)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--checkpoint", default=None, help="reuse this checkpoint instead of writing a random one")
    p.add_argument("--costs", default=None, help="reuse this cost table instead of profiling")
    p.add_argument("--slice", dest="slices", nargs=4, action="append", metavar=("NAME", "TRACE", "REQUESTS", "RATE"),
                   help="a trace slice: name, trace file, requests, rate scale (repeatable; default: "
                        "azure 400 x2 and mooncake 200 x1.5 from configs/planner/traces)")
    p.add_argument("--skip", type=int, default=0, help="start every slice at this request of its trace")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-input-len", type=int, default=4096)
    p.add_argument("--max-output-len", type=int, default=256)
    p.add_argument("--config", default=str(ROOT / "configs" / "gpu-colocated.yaml"))
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--micro-batches", type=int, default=1, help="1: the colocated layout the planner's search uses")
    p.add_argument("--max-prefill-tokens", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV blocks of the server's cache (default 20000 on cuda: 40 GiB for llama3-8b; 1024 on cpu)")
    p.add_argument("--calibration-batches", default=None, help="default 1,16,48,96 (cuda), 1,4 (cpu)")
    p.add_argument("--calibration-prompt", type=int, default=None, help="default 512 (cuda), 16 (cpu)")
    p.add_argument("--calibration-output", type=int, default=None, help="default 128 (cuda), 12 (cpu)")
    p.add_argument("--eager", action="store_true",
                   help="on cuda: the server without CUDA graphs and the profile's eager model curves "
                        "(the validation of the earlier, host-bound engine)")
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--budget-s", type=float, default=510, help="kill the server when the run reaches this")
    p.add_argument("--work-dir", default=None, help="checkpoint, bench outputs (default: a temporary dir)")
    p.add_argument("--out-dir", default="out/validate")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.shape = args.shape or ("llama3-8b" if cuda else "tiny")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.kv_blocks = args.kv_blocks or (20000 if cuda else 1024)
    args.calibration_batches = [int(b) for b in (args.calibration_batches or ("1,16,48,96" if cuda else "1,4"))
                                .split(",")]
    args.calibration_prompt = args.calibration_prompt or (512 if cuda else 16)
    args.calibration_output = args.calibration_output or (128 if cuda else 12)
    args.slices = [(n, Path(t), int(r), float(s)) for n, t, r, s in (args.slices or DEFAULT_SLICES)]
    return args


def main(argv: list[str] | None = None) -> int:
    return validate(parse_args(argv))

