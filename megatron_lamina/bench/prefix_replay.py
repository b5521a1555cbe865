"""The prefix-cache benchmark of one GPU (issue 25): the Mooncake traces replayed with the
cache off, on, and on with a host tier. The program of tools/bench_prefix_cache.py.

    python3 tools/bench_prefix_cache.py --out-dir $OUT        # on the device machine

For each mode (`kv_cache.prefix_caching` false, true, and with `--modes ...,host` true with
a host tier of --host-cache-gib) one server is started (torchrun launcher/serve.py, --config
plus --set, the model a random-weight --shape drawn at load), and each trace is replayed on
it in turn, after `POST /reset_prefix_cache` so that no trace starts with another's blocks.
A replay is bench/prefix_trace.replay_window's: with the cache on, the --warmup requests
before the window are sent first, prefill only and all at once, and not measured (with it
off they would leave nothing behind, so they are not sent); then the window, requests
--skip .. --skip + --requests, through bench/serving_replay.py with `--prefix-blocks`
(prompts from the trace's hash_ids, its output lengths, Poisson arrivals at --rate for every
trace and mode, greedy). Each window reports the hit rate the server measured (cached prompt
tokens over prompt tokens, from the responses' usage), the share served from the host tier
(`/metrics`), TTFT p50/p90, output tokens/s and requests/s; beside it the offline LRU bound
of the same requests (bench/prefix_trace.window_bounds) at the server's KV capacity
(`lamina_kv_blocks_total` x block size, plus the host tier's blocks its start-up line
printed) and unlimited, after the warm-up and after the whole trace before the window. Writes
OUT_DIR/prefix_cache.json (after every window) and the servers' logs (each replay's own
report and plot go to --work-dir); prints a table. bench/prefix_predict.py predicts the same
replay with the planner's simulator.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import time
import urllib.request
from pathlib import Path

from megatron_lamina.bench import serving_replay
from megatron_lamina.bench.prefix_trace import WARMUP_OUTPUT_LEN, check_warmup, replay_window, window_bounds
from megatron_lamina.bench.server_job import ServerJob, free_port, read_metrics
from megatron_lamina.checkpoint.random_weights import write_random_spec
from megatron_lamina.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TRACE_FILES = {"conversation": "mooncake_conversation_trace.jsonl", "synthetic": "mooncake_synthetic_trace.jsonl"}
MODES = ("off", "on", "host")
# One GPU, and a queue that holds whatever the replay offers (its warm-up arrives at once).
BENCH_OVERRIDES = ("parallel.tensor_parallel=1", "server.max_queued_requests=4096")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def trace_path(args, name: str) -> Path:
    return args.traces_dir / TRACE_FILES[name]


def mode_overrides(args, mode: str) -> list[str]:
    """The server's --set of `mode`: the benchmark's, the user's, then the cache's own."""
    overrides = [*BENCH_OVERRIDES, *args.set, f"kv_cache.prefix_caching={str(mode != 'off').lower()}"]
    return overrides + ([f"kv_cache.host_cache_gib={args.host_cache_gib}"] if mode == "host" else [])


def replay(args, url: str, name: str, out: Path, skip: int, count: int, warmup: bool) -> dict:
    """One serving_replay run: the window (Poisson at --rate), or its warm-up (all at once, prefill only)."""
    argv = ["--url", url, "--trace", str(trace_path(args, name)), "--prefix-blocks", "--skip", str(skip),
            "--max-requests", str(count), "--seed", str(args.seed), "--max-input-len", str(args.max_input_len),
            "--temperature", "0", "--timeout", "900", "--token-id-range", f"{args.token_ids[0]}:{args.token_ids[1]}",
            "--out", str(out), "--plot", str(out.with_suffix(".png"))]
    argv += (["--rate-scale", "inf", "--max-output-len", str(WARMUP_OUTPUT_LEN)] if warmup
             else ["--rate", str(args.rate), "--max-output-len", str(args.max_output_len)])
    with contextlib.redirect_stdout(io.StringIO()):
        serving_replay.main(argv)
    return json.loads(out.read_text())


def prefix_counters(url: str) -> dict[str, float]:
    """The server's prefix-cache hit tokens so far, by tier (device, host)."""
    metrics = read_metrics(url)
    return {tier: metrics[f'lamina_prefix_cache_hits_total{{tier="{tier}"}}'] for tier in ("device", "host")}


def replay_trace(args, url: str, name: str, mode: str) -> dict:
    """Warm-up (cache on) and window of trace `name` on a server just reset; the window's figures."""
    row: dict = {}
    if args.warmup and mode != "off":
        started = time.monotonic()
        warm = replay(args, url, name, args.work_dir / f"warmup-{name}-{mode}.json", args.skip - args.warmup,
                      args.warmup, warmup=True)
        row["warmup"] = {"requests": warm["sent"], "failed": warm["failed"], "seconds": time.monotonic() - started,
                         "prefix_cache_hit_rate": warm["prefix_cache_hit_rate"]}
        log(f"{name}, cache {mode}: warm-up of {warm['completed']}/{warm['sent']} in {row['warmup']['seconds']:.0f} s")
    before = prefix_counters(url)
    report = replay(args, url, name, args.work_dir / f"replay-{name}-{mode}.json", args.skip, args.requests,
                    warmup=False)
    after = prefix_counters(url)
    keep = ("sent", "completed", "failed", "prefix_cache_hit_rate", "ttft_s", "output_throughput_tok_s",
            "request_throughput_req_s", "input_tokens", "duration_s")
    row |= {k: report[k] for k in keep}
    # The window's prompt tokens the host tier served (its requests only: the warm-up is done).
    row["host_hit_rate"] = (after["host"] - before["host"]) / max(report["input_tokens"], 1) if mode != "off" else 0.0
    row["sent_lengths"] = [r["input_len"] for r in sorted(report["requests"], key=lambda r: r["index"])]
    return row


def run_mode(args, mode: str, checkpoint: Path, out: Path, results: dict) -> None:
    overrides = mode_overrides(args, mode) + [f"model.checkpoint={checkpoint}"]
    cfg = load_config(args.config, overrides)
    server = ServerJob(overrides, args.config, free_port(), out / f"server-{mode}.log", cpu=args.device == "cpu",
                       nproc=cfg.world_size)
    try:
        server.wait_healthy(timeout=900)
        log(f"cache {mode}: server ready in {server.ready_s:.0f} s")
        for name in args.traces:
            urllib.request.urlopen(urllib.request.Request(f"{server.url}/reset_prefix_cache", method="POST"),
                                   timeout=30).read()
            row = replay_trace(args, server.url, name, mode)
            # The engine reports its blocks with its steps: known once a replay ran.
            capacity = int(read_metrics(server.url)["lamina_kv_blocks_total"]) * cfg.kv_cache.block_size
            host = re.search(r"prefix cache host tier: (\d+) blocks of (\d+) tokens", server.tail(None))
            capacity += int(host.group(1)) * int(host.group(2)) if host else 0  # the start-up line's size
            warm, window = replay_window(trace_path(args, name), args.skip, args.warmup, args.requests, args.rate,
                                         args.seed, args.max_input_len, args.max_output_len)
            assert row.pop("sent_lengths") == [r.input_len for r in window], "the replay sent another window"
            sent_warm = warm if mode != "off" else []  # the cache off is sent no warm-up
            row["bound"] = window_bounds(trace_path(args, name), sent_warm, window, args.skip, capacity,
                                         args.max_input_len)
            row["server_ready_s"] = server.ready_s
            results[f"{name}/{mode}"] = row
            (out / "prefix_cache.json").write_text(json.dumps(results, indent=1, default=str))
            log(f"{name}, cache {mode}: {row['completed']}/{row['sent']} done, hit rate "
                f"{row['prefix_cache_hit_rate']} (host {row['host_hit_rate']:.4f}), "
                f"TTFT p50 {row['ttft_s'].get('p50')}")
    finally:
        server.stop()


def add_window_arguments(p: argparse.ArgumentParser) -> None:
    """What the replay sends and on which server: the benchmark's and its prediction's arguments."""
    p.add_argument("--traces-dir", type=Path, default=None,
                   help="the Mooncake traces (default: ../shared/traces beside the checkout, else shared/traces in it)")
    p.add_argument("--traces", default="conversation,synthetic")
    p.add_argument("--modes", default="off,on",
                   help="off, on (the device cache), host (on, with --host-cache-gib of host tier)")
    p.add_argument("--config", default=str(ROOT / "configs" / "gpu-colocated.yaml"))
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help=f"server overrides, after {' and '.join(BENCH_OVERRIDES)}")
    p.add_argument("--host-cache-gib", type=float, default=32.0, help="the host tier of the host mode")
    p.add_argument("--skip", type=int, default=0, help="the measured window starts at this request of each trace")
    p.add_argument("--requests", type=int, default=60, help="the measured window's requests")
    p.add_argument("--warmup", type=int, default=0,
                   help="the requests before --skip sent first with the cache on (prefill only, at once, not measured)")
    p.add_argument("--rate", type=float, default=4.0,
                   help="the window's Poisson arrivals (req/s), the same for every replay")
    p.add_argument("--max-input-len", type=int, default=7680, help="prompts clipped (the shape's context)")
    p.add_argument("--max-output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)


def check_window_arguments(p: argparse.ArgumentParser, args) -> None:
    """Parsed arguments made whole (lists, the traces' directory) or refused with the key at fault."""
    args.set = list(args.set or [])
    args.traces = args.traces.split(",")
    if set(args.modes.split(",")) - set(MODES):
        p.error(f"--modes {args.modes}: each of {', '.join(MODES)}")
    unknown = [t for t in args.traces if t not in TRACE_FILES]
    if unknown:
        p.error(f"--traces: unknown {unknown}; known: {', '.join(TRACE_FILES)}")
    try:
        check_warmup(args.skip, args.warmup)
    except ValueError as e:
        p.error(str(e))
    if args.traces_dir is None:
        beside = ROOT.parent / "shared" / "traces"
        args.traces_dir = beside if beside.is_dir() else ROOT / "shared" / "traces"
    missing = [f for t, f in TRACE_FILES.items() if t in args.traces and not (args.traces_dir / f).is_file()]
    if missing:
        p.error(f"--traces-dir {args.traces_dir}: no {', '.join(missing)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="out/prefix-cache", help="the summary and the servers' logs")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/lamina-prefix-cache"),
                   help="each replay's own report and latency plot")
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--checkpoint", default="/tmp/lamina-random-ckpt",
                   help="if missing, a random --shape whose weights each server draws at load is written here")
    p.add_argument("--token-ids", type=int, nargs=2, default=(3, 32000), metavar=("LO", "HI"))
    add_window_arguments(p)
    args = p.parse_args(argv)
    check_window_arguments(p, args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").exists():
        log(f"writing a random {args.shape} checkpoint (weights drawn at load) to {checkpoint}")
        write_random_spec(checkpoint, args.shape, args.dtype, overwrite=True)
    results: dict = {"args": vars(args)}
    for mode in args.modes.split(","):
        try:
            run_mode(args, mode, checkpoint, out, results)
        except Exception as e:  # noqa: BLE001 - a mode's failure is a finding; the next one still runs
            results[f"{mode}_error"] = f"{type(e).__name__}: {e}"[-3000:]
            log(f"cache {mode} failed: {results[f'{mode}_error']}")
        (out / "prefix_cache.json").write_text(json.dumps(results, indent=1, default=str))
    print_table(results, args)
    return 0


def print_table(results: dict, args) -> None:
    def f(value, fmt="{:.3f}") -> str:
        return "-" if value is None else fmt.format(value)

    print(f"{'trace':<13} {'cache':<5} {'done':>8}  {'hit rate':>8}  {'of it host':>10}  "
          f"{'LRU bound: capacity / unlimited / whole history':>47}  {'TTFT p50 / p90 (s)':>18}  {'of off p50':>10}  "
          f"{'out tok/s':>9}  {'req/s':>5}  {'warm-up (s)':>11}")
    for name in args.traces:
        off = results.get(f"{name}/off", {}).get("ttft_s", {}).get("p50")
        for mode in args.modes.split(","):
            row = results.get(f"{name}/{mode}")
            if row is None:
                continue
            bound, ttft = row["bound"], row["ttft_s"]
            bounds = " / ".join(f(bound[k]) for k in ("at_capacity", "unlimited", "whole_history_unlimited"))
            ratio = ttft["p50"] / off if off and ttft.get("p50") is not None else None
            print(f"{name:<13} {mode:<5} {row['completed']:>4}/{row['sent']:<3}  {f(row['prefix_cache_hit_rate']):>8}  "
                  f"{f(row['host_hit_rate']):>10}  {bounds:>47}  {f(ttft['p50']) + ' / ' + f(ttft['p90']):>18}  "
                  f"{f(ratio, '{:.2f}'):>10}  {f(row['output_throughput_tok_s'], '{:.0f}'):>9}  "
                  f"{f(row['request_throughput_req_s'], '{:.2f}'):>5}  "
                  f"{f(row.get('warmup', {}).get('seconds'), '{:.0f}'):>11}")
    for key, value in results.items():
        if key.endswith("_error"):
            print(key, value[-300:])
