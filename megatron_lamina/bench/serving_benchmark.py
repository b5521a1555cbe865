"""The whole serving benchmark of one GPU machine in one command (issue #12's figures): the
program of tools/serving_benchmark.py.

    python3 tools/serving_benchmark.py --out-dir $OUT              # on the device machine
    python3 tools/serving_benchmark.py --phases server --trace-requests 300 ...
    # FP8 weights and KV beside bf16, one server each, on weights drawn at load (no 16 GB write)
    python3 tools/serving_benchmark.py --phases checkpoint,server --weights-at-load --modes bf16,fp8 \
        --trace-requests 0 --checkpoint /tmp/spec-8b --out-dir $OUT/8b
    # LLaMA-3-70B's shape in FP8 on one card, as many requests as its cache holds
    python3 tools/serving_benchmark.py --phases checkpoint,server --weights-at-load --shape llama3-70b \
        --modes fp8 --closed auto --trace-requests 0 --checkpoint /tmp/spec-70b --out-dir $OUT/70b

Phases (--phases, in this order; each is timed and any failure is reported, not fatal):
  checkpoint  a random-weight checkpoint of --shape (checkpoint/random_weights.py, on the GPU);
              with --weights-at-load one whose tensors each model worker draws at load
              (`write_random_spec`: a few files, for shapes whose weights do not fit the disk)
  server      the server (torchrun launcher/serve.py --config --set ..., as many ranks as the
              config's layout has: model workers + attention workers), its start-up time and
              the phases it logged; a closed batch of --closed requests x (--input-len,
              --output-len) through tools/bench_serving.py, with the server's /metrics and
              the utilization (NVML) of every GPU the ranks use sampled (rank r runs on GPU
              r mod the GPUs there; the headline figure is their mean, each one beside it) and
              the CPU time of rank 0's main thread (/proc: the engine loop) against its other
              threads, and of the HTTP front end process (all its threads), in shares of a core,
              and the decode phase of that batch read
              out (bench/decode_window.py); then the --trace replay (first --trace-requests,
              --rate-scale x their arrival rate, prompts clipped to --max-input-len); stop
  batch       the batch job (torchrun launcher/generate.py, the same ranks) on --batch-prompts prompts of the
              closed batch's shape, its generation throughput from its own summary line
  decode      tools/bench_decode.py's CUDA-graph step at the decode window's mean batch and
              context: the component figure the server's decode step is compared with
--modes runs the server phase once per mode, each its own server with the mode's overrides
(MODES: fp8 is FP8 weights quantized at load from the same checkpoint and an FP8 KV cache),
its outputs in OUT_DIR/MODE/; the later phases run the first mode. `--closed auto` sends as
many requests as the server's KV cache holds at --input-len + --output-len (read from its
sizing line), at most scheduler.max_batch_size.
Writes OUT_DIR/serving_benchmark.json and the tools' own outputs; prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: launcher/, configs/, tools/bench_decode.py

from megatron_lamina.bench import serving_replay
from megatron_lamina.bench.decode_window import decode_window
from megatron_lamina.bench.server_job import (
    GpuPoller,
    MetricsPoller,
    ServerJob,
    server_cpu,
    free_port,
    launcher_command,
    mean_between,
    thread_cpu_s,
)
from megatron_lamina.checkpoint.random_weights import write_random_checkpoint, write_random_spec
from megatron_lamina.config import load_config

PHASES = ("checkpoint", "server", "batch", "decode")
# Each phase's prompts from its own seed: random token ids (words for the batch job), every
# request its own, so no phase's prompts share a prefix with another's and the prefix cache
# (on by default) serves none of them; its gains are measured on the Mooncake traces.
SEEDS = {"greedy": 1, "closed": 0, "trace": 2, "batch": 3}
# --modes: each mode's server overrides, after --set.
MODES = {
    "bf16": [],
    "fp8": ["model.weight_dtype=fp8_e4m3", "kv_cache.dtype=fp8_e4m3"],
    "fp8-kv": ["kv_cache.dtype=fp8_e4m3"],
    "fp8-weights": ["model.weight_dtype=fp8_e4m3"],
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def bench_serving(argv: list[str]) -> dict:
    """tools/bench_serving.py's program, in this process; its JSON report."""
    with contextlib.redirect_stdout(io.StringIO()):
        serving_replay.main(argv)
    return json.loads(Path(argv[argv.index("--out") + 1]).read_text())


def summary(report: dict) -> dict:
    return {k: report[k] for k in ("sent", "completed", "failed", "duration_s", "output_throughput_tok_s",
                                   "request_throughput_req_s", "ttft_s", "tpot_s", "itl_s")}


def sampling_args(args) -> list[str]:
    """The requests' sampling, as users send it (the server's defaults: temperature 1.0)."""
    return ["--temperature", str(args.temperature)] + ([] if args.top_p is None else ["--top-p", str(args.top_p)])


def job_ranks(args) -> int:
    """The torchrun job's ranks for this config and these overrides (a config error stops here)."""
    return load_config(args.config, args.set).world_size


def closed_requests(args, startup_log: list[str]) -> int:
    """--closed, or for `auto` the requests of --input-len + --output-len tokens that the
    server's KV cache holds (its sizing line), at most the config's batch cap."""
    if args.closed != "auto":
        return int(args.closed)
    sizing = [m for line in startup_log if (m := re.search(r"KV cache \(\S+\): ([\d,]+) blocks of (\d+) tokens", line))]
    if not sizing:
        raise RuntimeError("--closed auto: the server logged no KV cache sizing line")
    blocks, block_size = int(sizing[-1].group(1).replace(",", "")), int(sizing[-1].group(2))
    per_request = -(-(args.input_len + args.output_len) // block_size)
    return min(blocks // per_request, load_config(args.config, args.set).scheduler.max_batch_size)


def run_server(args, out: Path, checkpoint: Path, result: dict) -> None:
    """Fills `result` as it goes (a later failure keeps what was measured)."""
    ranks = job_ranks(args)
    result["ranks"] = ranks
    server = ServerJob(args.set + [f"model.checkpoint={checkpoint}"], args.config, free_port(), out / "server.log",
                       cpu=args.device == "cpu", nproc=ranks)
    gpu = GpuPoller(devices=ranks, interval=0.1) if args.device == "cuda" else None
    try:
        server.wait_healthy(timeout=900)
        result["startup_s"] = server.ready_s
        result["startup_log"] = [line for line in server.tail(20000).splitlines() if line.startswith("[lamina")]
        log(f"server healthy in {server.ready_s:.1f} s")
        closed_count = result["closed_requests"] = closed_requests(args, result["startup_log"])
        poller = MetricsPoller(server.url, interval=0.2)
        engine_pid, frontend_pid = server.driver_pid(), server.frontend_pid()
        pids = [p for p in (engine_pid, frontend_pid) if p]
        cpu_before, started = {p: thread_cpu_s(p) for p in pids}, time.monotonic()
        if args.greedy_too:  # the same closed batch greedy first: the sampled headline's reference
            greedy = bench_serving(["--url", server.url, "--closed", str(closed_count), "--input-len",
                                    str(args.input_len), "--output-len", str(args.output_len), "--timeout", "900",
                                    "--temperature", "0", "--seed", str(SEEDS["greedy"]),
                                    "--out", str(out / "bench-closed-greedy.json")])
            result["closed_greedy"] = summary(greedy)
            log(f"closed batch, greedy: {greedy['output_throughput_tok_s']:.0f} output tok/s")
            poller.stop()
            poller = MetricsPoller(server.url, interval=0.2)
            cpu_before, started = {p: thread_cpu_s(p) for p in pids}, time.monotonic()
        closed = bench_serving(["--url", server.url, "--closed", str(closed_count), "--input-len",
                                str(args.input_len), "--output-len", str(args.output_len), "--timeout", "900",
                                *sampling_args(args), "--seed", str(SEEDS["closed"]),
                                "--out", str(out / "bench-closed.json")])
        samples = poller.stop()
        result["closed"] = summary(closed)
        gpu_samples = gpu.samples if gpu else []
        window = (closed["t0_monotonic"], closed["t0_monotonic"] + closed["wall_s"])
        result["closed"]["gpu_util_nvml"] = mean_between(gpu_samples, *window)
        result["closed"]["gpu_util_nvml_per_device"] = gpu.per_device_between(*window) if gpu else []
        result["decode_window"] = decode_window(closed, samples, gpu_samples)
        if engine_pid:
            cpu_after = {p: thread_cpu_s(p) for p in pids}
            result["closed"]["server_cpu"] = server_cpu(engine_pid, frontend_pid, cpu_before, cpu_after,
                                                        time.monotonic() - started, closed["output_tokens"])
        log(f"closed batch: {closed['output_throughput_tok_s']:.0f} output tok/s; decode window "
            f"{result['decode_window']}")
        if args.trace_requests:
            poller = MetricsPoller(server.url, interval=1.0)
            trace = bench_serving(["--url", server.url, "--trace", args.trace, "--max-requests",
                                   str(args.trace_requests), "--rate-scale", str(args.rate_scale),
                                   "--max-input-len", str(args.max_input_len), "--timeout", "900",
                                   *sampling_args(args), "--seed", str(SEEDS["trace"]),
                                   "--out", str(out / "bench-trace.json")])
            poller.stop()
            result["trace"] = summary(trace)
            result["trace"]["gpu_util_nvml"] = mean_between(gpu.samples if gpu else [], trace["t0_monotonic"],
                                                            trace["t0_monotonic"] + trace["wall_s"])
            log(f"trace: {trace['completed']}/{trace['sent']} in {trace['duration_s']:.1f} s")
    finally:
        if gpu:
            gpu.stop()
        server.stop()


def run_batch(args, out: Path, checkpoint: Path) -> dict:
    sampling = {"temperature": args.temperature, **({} if args.top_p is None else {"top_p": args.top_p})}

    def words(i: int) -> str:  # input_len - 1 words (+ BOS: input_len tokens), each record its own
        rng = random.Random(SEEDS["batch"] * 1_000_003 + i)
        return " ".join(f"w{3 + rng.randrange(1000)}" for _ in range(args.input_len - 1))

    lines = [json.dumps({"id": i, "prompt": words(i), "max_tokens": args.output_len, **sampling,
                         "ignore_eos": True}) for i in range(args.batch_prompts)]
    (out / "batch-in.jsonl").write_text("\n".join(lines) + "\n")
    cmd = launcher_command("generate.py", job_ranks(args), args.config, args.set + [f"model.checkpoint={checkpoint}"])
    cmd += ["--input", str(out / "batch-in.jsonl"), "--output", str(out / "batch-out.jsonl"), "--quiet"]
    started = time.monotonic()
    with open(out / "batch.log", "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    text = (out / "batch.log").read_text()
    match = re.search(r"generated (\d+) tokens in ([\d.]+) s", text)
    records = [json.loads(x) for x in (out / "batch-out.jsonl").read_text().splitlines() if x.strip()]
    result = {"exit_code": code, "wall_s": time.monotonic() - started, "records": len(records),
              "tokens": sum(len(r.get("token_ids", [])) for r in records)}
    if match:
        result.update(generated=int(match.group(1)), generation_s=float(match.group(2)),
                      output_throughput_tok_s=int(match.group(1)) / float(match.group(2)))
    return result


def run_decode(args, out: Path, window: dict) -> dict:
    batch, context = round(window["mean_batch"]), round(window["mean_context"])
    cmd = [sys.executable, str(ROOT / "tools" / "bench_decode.py"), "--model-batches", "1", "--batches", str(batch),
           "--contexts", str(context), "--cuda-graphs", "1", "--block-size", "16", "--out", str(out / "decode.json")]
    with open(out / "decode.log", "w") as f:
        subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    [row] = [r for r in json.loads((out / "decode.json").read_text())["decode"] if r.get("cuda_graphs")]
    return {"batch": batch, "context": context, "graph_step_s": row["ms"] / 1e3,
            "server_over_bench": window["mean_step_s"] / (row["ms"] / 1e3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="out/serving")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run of the tool itself")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--checkpoint", default="/tmp/lamina-random-ckpt")
    p.add_argument("--config", default=str(ROOT / "configs" / "gpu-colocated.yaml"))
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="server overrides beyond the checkpoint (default: only the two the shipped config cannot "
                        "know: TP 1, one GPU lent; 4096 requests in flight before a 503, since the trace replay "
                        "offers more than the server serves)")
    p.add_argument("--temperature", type=float, default=1.0, help="every request's (default: the server's default)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy-too", action="store_true",
                   help="run the closed batch greedy too, first, on the same server (the sampled figure's reference)")
    p.add_argument("--closed", default="256", type=lambda v: v if v == "auto" else str(int(v)),
                   help="closed-batch requests, or auto: as many as the server's KV cache holds")
    p.add_argument("--modes", default="bf16", type=lambda v: v.split(","),
                   help=f"comma-separated server modes, one server each: {', '.join(MODES)}")
    p.add_argument("--weights-at-load", action="store_true",
                   help="checkpoint phase: write a checkpoint whose random tensors are drawn at load (no weights on disk)")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--trace", default=str(ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"))
    p.add_argument("--trace-requests", type=int, default=1500)
    p.add_argument("--rate-scale", type=float, default=8.0)
    p.add_argument("--max-input-len", type=int, default=4096)
    p.add_argument("--batch-prompts", type=int, default=1000)
    args = p.parse_args(argv)
    args.set = args.set or ["parallel.tensor_parallel=1", "server.max_queued_requests=4096"]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"--modes {','.join(unknown)}: allowed values are {', '.join(MODES)}")
    base_set = args.set
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint)
    results: dict = {"args": vars(args)}
    for phase in args.phases.split(","):
        started = time.monotonic()
        log(f"phase {phase}")
        try:
            if phase == "checkpoint":
                if args.weights_at_load:
                    write_random_spec(checkpoint, args.shape, args.dtype, overwrite=True)
                elif not (checkpoint / "config.json").exists():
                    write_random_checkpoint(checkpoint, args.shape, args.dtype, args.device, overwrite=True)
            elif phase == "server":
                for mode in args.modes:  # one server each; the first mode's is "server" for the later phases
                    args.set = base_set + MODES[mode]
                    mode_out = out / mode if len(args.modes) > 1 else out
                    mode_out.mkdir(parents=True, exist_ok=True)
                    log(f"server mode {mode}: {' '.join(MODES[mode]) or 'as configured'}")
                    run_server(args, mode_out, checkpoint, results.setdefault("modes", {}).setdefault(mode, {}))
                results["server"] = results["modes"][args.modes[0]]
                args.set = base_set + MODES[args.modes[0]]
            elif phase == "batch":
                results["batch"] = run_batch(args, out, checkpoint)
            elif phase == "decode":
                results["decode"] = run_decode(args, out, results["server"]["decode_window"])
        except Exception as e:  # noqa: BLE001 - a phase's failure is a finding; the next phases still run
            results[f"{phase}_error"] = f"{type(e).__name__}: {e}"[-3000:]
            log(f"phase {phase} failed: {results[f'{phase}_error']}")
        results[f"{phase}_s"] = time.monotonic() - started
        (out / "serving_benchmark.json").write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    return 0


def print_table(r: dict) -> None:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    server, closed = r.get("server", {}), r.get("server", {}).get("closed", {})
    greedy = server.get("closed_greedy", {})
    ratio = (closed["output_throughput_tok_s"] / greedy["output_throughput_tok_s"]
             if closed.get("output_throughput_tok_s") and greedy.get("output_throughput_tok_s") else None)
    per_gpu = [u for u in closed.get("gpu_util_nvml_per_device") or [] if u is not None]
    cpu = closed.get("server_cpu") or {}
    window, trace, batch, decode = server.get("decode_window", {}), server.get("trace", {}), r.get("batch", {}), \
        r.get("decode", {})
    rows = [
        ("server ranks", str(server.get("ranks", "-"))),
        ("server start-up (s)", f(server.get("startup_s"))),
        (f"closed batch: output tok/s (temperature {r['args']['temperature']:g}, top_p {r['args']['top_p']})",
         f(closed.get("output_throughput_tok_s"), "{:.0f}")),
        ("closed batch, greedy: output tok/s (sampled / greedy)",
         f"{f(greedy.get('output_throughput_tok_s'), '{:.0f}')} ({f(ratio, '{:.3f}')})"),
        ("closed batch: TTFT p50 (s) / TPOT p50 (ms)",
         f"{f((closed.get('ttft_s') or {}).get('p50'), '{:.3f}')} / "
         f"{f((closed.get('tpot_s') or {}).get('p50') and closed['tpot_s']['p50'] * 1e3, '{:.2f}')}"),
        ("closed batch: GPU util (NVML, whole batch)", f(closed.get("gpu_util_nvml"), "{:.2f}")
         + (f" (per GPU {', '.join(f'{u:.2f}' for u in per_gpu)})" if len(per_gpu) > 1 else "")),
        ("closed batch: CPU, engine loop / rank 0's other threads / front end (cores)",
         f"{f(cpu.get('engine_loop_core_share'), '{:.2f}')} / {f(cpu.get('engine_other_threads_core_share'), '{:.2f}')}"
         f" / {f(cpu.get('frontend_core_share'), '{:.2f}')} ({f(cpu.get('frontend_us_per_token'))} us of front end "
         "per output token)"),
        ("decode window: mean step (ms)", f(window.get("mean_step_s") and window["mean_step_s"] * 1e3, "{:.2f}")),
        ("decode window: mean batch / context", f"{f(window.get('mean_batch'))} / {f(window.get('mean_context'))}"),
        ("decode window: GPU busy (events) / util (NVML)", f"{f(window.get('gpu_busy_events'), '{:.3f}')} / "
                                                           f"{f(window.get('gpu_util_nvml'), '{:.3f}')}"),
        ("bench_decode graph step there (ms)", f(decode.get("graph_step_s") and decode["graph_step_s"] * 1e3, "{:.2f}")),
        ("server step / bench_decode step", f(decode.get("server_over_bench"), "{:.3f}")),
        ("trace: completed / sent", f"{trace.get('completed', '-')} / {trace.get('sent', '-')}"),
        ("trace: output tok/s, req/s", f"{f(trace.get('output_throughput_tok_s'), '{:.0f}')}, "
                                       f"{f(trace.get('request_throughput_req_s'), '{:.2f}')}"),
        ("trace: TTFT p50/p90 (s)", f"{f((trace.get('ttft_s') or {}).get('p50'), '{:.3f}')} / "
                                    f"{f((trace.get('ttft_s') or {}).get('p90'), '{:.3f}')}"),
        ("trace: TPOT p50/p90 (ms)", f"{f((trace.get('tpot_s') or {}).get('p50') and trace['tpot_s']['p50'] * 1e3)} / "
                                     f"{f((trace.get('tpot_s') or {}).get('p90') and trace['tpot_s']['p90'] * 1e3)}"),
        ("batch job: output tok/s (generation)", f(batch.get("output_throughput_tok_s"), "{:.0f}")),
        ("batch job: records / wall (s)", f"{batch.get('records', '-')} / {f(batch.get('wall_s'))}"),
    ]
    modes = r.get("modes", {})
    first = next(iter(modes), None)
    for mode, m in list(modes.items())[1:]:
        mine, base = (m.get("closed") or {}).get("output_throughput_tok_s"), \
            (modes[first].get("closed") or {}).get("output_throughput_tok_s")
        rows.append((f"mode {mode}: closed batch output tok/s ({mode} / {first})",
                     f"{f(mine, '{:.0f}')} ({f(mine and base and mine / base, '{:.3f}')})"))
    for mode, m in modes.items():
        window = m.get("decode_window", {})
        rows.append((f"mode {mode}: requests, start-up (s), TPOT p50 (ms), mean decode step (ms)",
                     f"{m.get('closed_requests', '-')}, {f(m.get('startup_s'))}, "
                     f"{f(((m.get('closed') or {}).get('tpot_s') or {}).get('p50') and m['closed']['tpot_s']['p50'] * 1e3, '{:.2f}')}, "
                     f"{f(window.get('mean_step_s') and window['mean_step_s'] * 1e3, '{:.2f}')}"))
    for key in r:
        if key.endswith("_error"):
            rows.append((key, r[key][-300:]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

