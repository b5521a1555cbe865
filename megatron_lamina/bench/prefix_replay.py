"""The prefix-cache benchmark of one GPU (issue 25): the Mooncake traces replayed with the
cache off and on. The program of tools/bench_prefix_cache.py.

    python3 tools/bench_prefix_cache.py --out-dir $OUT        # on the device machine

For each mode (`kv_cache.prefix_caching` false, true, and with `--modes ...,host` true with
a host tier of --host-cache-gib) one server is started (torchrun
launcher/serve.py, --config plus --set, the model a random-weight checkpoint of --shape
written once), and each trace is replayed on it in turn (bench/serving_replay.py with
`--prefix-blocks`: prompts from the trace's hash_ids, its output lengths, Poisson arrivals at
--rate for every trace and mode, greedy), after `POST /reset_prefix_cache` so that no trace
starts with another's blocks. Each replay reports the hit rate the server measured (cached
prompt tokens over prompt tokens, from the responses' usage), TTFT p50/p90, output tokens/s
and requests/s; beside it the offline LRU bound of the same requests (bench/prefix_trace.py)
at the server's KV capacity (`lamina_kv_blocks_total` x block size, plus the host tier's
blocks its start-up line printed) and unlimited. Writes
OUT_DIR/prefix_cache.json and the servers' logs (each replay's own report and plot go to
--work-dir); prints a table.
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
from megatron_lamina.bench.prefix_trace import lru_hit_bound, read_hash_ids
from megatron_lamina.bench.server_job import ServerJob, free_port, read_metrics
from megatron_lamina.checkpoint.random_weights import write_random_checkpoint
from megatron_lamina.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TRACE_FILES = {"conversation": "mooncake_conversation_trace.jsonl", "synthetic": "mooncake_synthetic_trace.jsonl"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def replay_trace(args, url: str, name: str, out: Path) -> dict:
    argv = ["--url", url, "--trace", str(args.traces_dir / TRACE_FILES[name]), "--prefix-blocks", "--max-requests", str(args.requests),
            "--rate", str(args.rate), "--seed", str(args.seed), "--max-input-len", str(args.max_input_len),
            "--max-output-len", str(args.max_output_len), "--temperature", "0", "--timeout", "900",
            "--token-id-range", f"{args.token_ids[0]}:{args.token_ids[1]}", "--out", str(out),
            "--plot", str(out.with_suffix(".png"))]
    with contextlib.redirect_stdout(io.StringIO()):
        serving_replay.main(argv)
    report = json.loads(out.read_text())
    keep = ("sent", "completed", "failed", "prefix_cache_hit_rate", "ttft_s", "output_throughput_tok_s",
            "request_throughput_req_s", "input_tokens", "duration_s")
    return {k: report[k] for k in keep} | {"requests": [(r["index"], r["input_len"]) for r in report["requests"]]}


def bounds(name: str, args, requests: list[tuple[int, int]], capacity_tokens: int) -> dict:
    """The LRU bound of the replayed requests (their clipped lengths) at the server's capacity and unlimited."""
    ids = read_hash_ids(args.traces_dir / TRACE_FILES[name], limit=args.requests)
    replayed = [(ids[i], length) for i, length in sorted(requests)]
    return {"at_capacity": lru_hit_bound(replayed, capacity_tokens)["hit_rate"],
            "unlimited": lru_hit_bound(replayed, None)["hit_rate"], "capacity_tokens": capacity_tokens}


def run_mode(args, mode: str, checkpoint: Path, out: Path, results: dict) -> None:
    overrides = args.set + [f"model.checkpoint={checkpoint}", f"kv_cache.prefix_caching={str(mode != 'off').lower()}"]
    if mode == "host":
        overrides.append(f"kv_cache.host_cache_gib={args.host_cache_gib}")
    cfg = load_config(args.config, overrides)
    server = ServerJob(overrides, args.config, free_port(), out / f"server-{mode}.log", cpu=args.device == "cpu",
                       nproc=cfg.world_size)
    try:
        server.wait_healthy(timeout=900)
        log(f"cache {mode}: server ready in {server.ready_s:.0f} s")
        for name in args.traces:
            urllib.request.urlopen(urllib.request.Request(f"{server.url}/reset_prefix_cache", method="POST"),
                                   timeout=30).read()
            row = replay_trace(args, server.url, name, args.work_dir / f"replay-{name}-{mode}.json")
            # The engine reports its blocks with its steps: known once a replay ran.
            capacity = int(read_metrics(server.url)["lamina_kv_blocks_total"]) * cfg.kv_cache.block_size
            host = re.search(r"prefix cache host tier: (\d+) blocks of (\d+) tokens", server.tail(None))
            capacity += int(host.group(1)) * int(host.group(2)) if host else 0  # the start-up line's size
            row["bound"] = bounds(name, args, row.pop("requests"), capacity)
            results[f"{name}/{mode}"] = row
            log(f"{name}, cache {mode}: {row['completed']}/{row['sent']} done, hit rate "
                f"{row['prefix_cache_hit_rate']}, TTFT p50 {row['ttft_s'].get('p50')}")
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="out/prefix-cache", help="the summary and the servers' logs")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/lamina-prefix-cache"),
                   help="each replay's own report and latency plot")
    p.add_argument("--traces-dir", type=Path, default=None,
                   help="the Mooncake traces (default: ../shared/traces beside the checkout, else shared/traces in it)")
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--checkpoint", default="/tmp/lamina-random-ckpt", help="written here once if missing")
    p.add_argument("--config", default=str(ROOT / "configs" / "gpu-colocated.yaml"))
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="server overrides, after TP 1 and 4096 requests queued (one GPU; the replay offers more "
                        "than the server serves)")
    p.add_argument("--traces", default="conversation,synthetic")
    p.add_argument("--modes", default="off,on",
                   help="off, on (the device cache), host (on, with --host-cache-gib of host tier)")
    p.add_argument("--host-cache-gib", type=float, default=32.0, help="the host tier of the host mode")
    p.add_argument("--requests", type=int, default=60, help="the first N requests of each trace")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals (req/s), the same for every replay")
    p.add_argument("--max-input-len", type=int, default=7680, help="prompts clipped (the shape's context)")
    p.add_argument("--max-output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token-ids", type=int, nargs=2, default=(3, 32000), metavar=("LO", "HI"))
    args = p.parse_args(argv)
    args.set = ["parallel.tensor_parallel=1", "server.max_queued_requests=4096", *(args.set or [])]
    args.traces = args.traces.split(",")
    if set(args.modes.split(",")) - {"off", "on", "host"}:
        p.error(f"--modes {args.modes}: each of off, on, host")
    unknown = [t for t in args.traces if t not in TRACE_FILES]
    if unknown:
        p.error(f"--traces: unknown {unknown}; known: {', '.join(TRACE_FILES)}")
    if args.traces_dir is None:
        beside = ROOT.parent / "shared" / "traces"
        args.traces_dir = beside if beside.is_dir() else ROOT / "shared" / "traces"
    missing = [f for t, f in TRACE_FILES.items() if t in args.traces and not (args.traces_dir / f).is_file()]
    if missing:
        p.error(f"--traces-dir {args.traces_dir}: no {', '.join(missing)}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").exists():
        log(f"writing a random {args.shape} checkpoint to {checkpoint}")
        write_random_checkpoint(checkpoint, args.shape, args.dtype, args.device, overwrite=True)
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

    print(f"{'trace':<13} {'cache':<5} {'done':>8}  {'hit rate':>8}  {'LRU bound: capacity / unlimited':>31}  "
          f"{'TTFT p50 / p90 (s)':>18}  {'out tok/s':>9}  {'req/s':>5}")
    for name in args.traces:
        for mode in args.modes.split(","):
            row = results.get(f"{name}/{mode}")
            if row is None:
                continue
            bound, ttft = row["bound"], row["ttft_s"]
            print(f"{name:<13} {mode:<5} {row['completed']:>4}/{row['sent']:<3}  {f(row['prefix_cache_hit_rate']):>8}  "
                  f"{f(bound['at_capacity']) + ' / ' + f(bound['unlimited']):>31}  "
                  f"{f(ttft['p50']) + ' / ' + f(ttft['p90']):>18}  {f(row['output_throughput_tok_s'], '{:.0f}'):>9}  "
                  f"{f(row['request_throughput_req_s'], '{:.2f}'):>5}")
    for key, value in results.items():
        if key.endswith("_error"):
            print(key, value[-300:])
