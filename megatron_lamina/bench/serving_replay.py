"""Serving benchmark against any OpenAI-compatible completions endpoint: a trace replay or a
closed batch. The program of tools/bench_serving.py (its `main`), also called in-process by
tools/validate_planner.py.

    python tools/bench_serving.py --url http://127.0.0.1:8000 \\
        --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv --max-requests 200 \\
        --rate-scale 1 --slo-ttft 2 --slo-tpot 0.1 --out out/bench.json
    python tools/bench_serving.py --url http://127.0.0.1:8000 --closed 256 --input-len 1024 --output-len 256

`--closed N` sends N requests of exactly --input-len prompt and --output-len output tokens
all at once (no trace file), the closed-batch measurement of a server's throughput.

Replays a request trace (Azure CSV or Mooncake JSONL, ../shared/traces/README.md): each
request is sent at its trace arrival time (relative to the first, divided by --rate-scale)
or at Poisson arrivals of --rate requests/s, with a prompt of exactly the trace's input
length and exactly the trace's output length forced by `max_tokens` = `min_tokens` = the
length plus `ignore_eos` (vLLM-style extensions our server accepts; --no-extensions leaves
them out for servers that reject them, and lengths are then not guaranteed). Prompts are
token ids (`--prompt-mode token-ids`, exact; random ids in --token-id-range, seeded) or, for
servers that take only text, `--prompt-mode text`: the word --text-word repeated, about one
token each. --max-input-len / --max-output-len clip lengths for small models.
`--prefix-blocks` (Mooncake traces) builds each prompt from its `hash_ids` instead, so that
equal ids give equal 512-token blocks (bench/prefix_trace.py), and reports the share of
prompt tokens the server's prefix cache served (`usage.prompt_tokens_details.cached_tokens`).

Every request streams (SSE) and is accounted for: `completed` (HTTP 200, one `[DONE]`, a
finish reason, and exactly the requested output tokens) or `failed` with a reason; sent =
completed + failed. Reports request and token throughput over the run (first send to last
finish), TTFT, TPOT (time per output token after the first), inter-token latency and
end-to-end latency as mean/p50/p90/p99, goodput under --slo-ttft / --slo-tpot (seconds),
and writes --out JSON (with every request's record) and a PNG of the latency CDFs.
Output tokens are counted from `token_ids` in each chunk (our `return_token_ids`
extension), else one per non-empty text chunk, corrected by the final usage chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from pathlib import Path

from megatron_lamina.planner.stats import summarize
from megatron_lamina.bench.prefix_trace import hash_prompt, read_hash_ids
from megatron_lamina.planner.trace import TraceRequest, read_trace, select, trace_format  # noqa: E402


def make_prompt(args, index: int, length: int) -> list[int] | str:
    if args.hash_ids is not None:  # --prefix-blocks: the trace's shared 512-token blocks
        return hash_prompt(args.hash_ids[index], length, args.token_id_range, args.seed)
    if args.prompt_mode == "text":
        return " ".join([args.text_word] * length)
    lo, hi = args.token_id_range
    rng = random.Random(args.seed * 1_000_003 + index)
    return [rng.randrange(lo, hi) for _ in range(length)]


def request_body(args, index: int, r: TraceRequest) -> dict:
    body = {"prompt": make_prompt(args, index, r.input_len), "max_tokens": r.output_len, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": args.temperature}
    if args.top_p is not None:
        body["top_p"] = args.top_p
    if args.model:
        body["model"] = args.model
    if not args.no_extensions:
        body.update(min_tokens=r.output_len, ignore_eos=True, return_token_ids=True)
    if int((index + 1) * args.schema_share) > int(index * args.schema_share):  # spread evenly
        from megatron_lamina.bench.structured import BENCH_FORMAT

        body["response_format"] = BENCH_FORMAT
    return body


async def send_one(client, args, index: int, r: TraceRequest, t0: float) -> dict:
    """Wait for the request's arrival time, send it, follow its stream; never raises."""
    delay = t0 + r.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    rec = {"index": index, "arrival_s": r.arrival_s, "input_len": r.input_len, "output_len": r.output_len,
           "sent_s": time.perf_counter() - t0, "status": None, "ok": False, "reason": None,
           "output_tokens": 0, "token_times_s": [], "finish_reason": None, "done": 0, "error": None,
           "cached_tokens": None}
    usage_tokens = None
    try:
        async with client.stream("POST", f"{args.url}/v1/completions", json=request_body(args, index, r)) as resp:
            rec["status"] = resp.status_code
            if resp.status_code != 200:
                rec["error"] = (await resp.aread()).decode(errors="replace")[:300]
                rec["reason"] = f"http_{resp.status_code}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    rec["done"] += 1
                    continue
                now = time.perf_counter() - t0
                chunk = json.loads(data)
                if "error" in chunk:
                    rec["error"] = str(chunk["error"].get("message", chunk["error"]))[:300]
                    continue
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                    rec["cached_tokens"] = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
                for choice in chunk.get("choices", []):
                    if "token_ids" in choice and choice["token_ids"] is not None:
                        n = len(choice["token_ids"])
                    else:
                        n = 1 if choice.get("text") else 0
                    rec["token_times_s"].extend([now] * n)
                    rec["output_tokens"] += n
                    rec["finish_reason"] = choice.get("finish_reason") or rec["finish_reason"]
    except Exception as e:  # noqa: BLE001 - every failure is a finding of the benchmark
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
        rec["reason"] = "timeout" if "Timeout" in type(e).__name__ else "exception"
        return rec
    if usage_tokens is not None and args.no_extensions:
        rec["output_tokens"] = usage_tokens  # text chunks may hold several tokens or none
    if rec["error"] is not None:
        rec["reason"] = "error_event"
    elif rec["done"] != 1 or rec["finish_reason"] is None:
        rec["reason"] = "incomplete_stream"
    elif rec["output_tokens"] != r.output_len and not args.no_extensions:
        rec["reason"] = "wrong_length"
    else:
        rec["ok"] = True
    return rec


# Requests are spread over this many httpx clients (request i on client i mod CLIENTS). One
# client's connection pool scans all its connections on every request start and end, so a
# single client holding 1,000 streams spent most of the benchmark's CPU in that scan (py-spy:
# httpcore's `_assign_requests_to_connections`), sent a closed batch of 1,000 over seconds and
# read tokens late: the client, not the server, set the first TTFTs.
CLIENTS = 64


async def replay(args, requests: list[TraceRequest]) -> tuple[list[dict], float]:
    import httpx

    semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(
            timeout=httpx.Timeout(args.timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)))
            for _ in range(min(CLIENTS, max(1, len(requests))))]

        async def bounded(i, r):
            client = clients[i % len(clients)]
            if semaphore is None:
                return await send_one(client, args, i, r, t0)
            async with semaphore:
                return await send_one(client, args, i, r, t0)

        t0, t0_monotonic = time.perf_counter(), time.monotonic()
        tasks = [asyncio.create_task(bounded(i, r)) for i, r in enumerate(requests)]
        records = await asyncio.gather(*tasks)
        return list(records), time.perf_counter() - t0, t0_monotonic


def metrics(records: list[dict], args) -> dict:
    done = [r for r in records if r["ok"]]
    ttft = [r["token_times_s"][0] - r["sent_s"] for r in done if r["token_times_s"]]
    tpot = [(r["token_times_s"][-1] - r["token_times_s"][0]) / (len(r["token_times_s"]) - 1)
            for r in done if len(r["token_times_s"]) > 1]
    itl = [b - a for r in done for a, b in zip(r["token_times_s"], r["token_times_s"][1:])]
    e2e = [r["token_times_s"][-1] - r["sent_s"] for r in done if r["token_times_s"]]
    start = min((r["sent_s"] for r in records), default=0.0)
    end = max((r["token_times_s"][-1] for r in done if r["token_times_s"]), default=start)
    window = max(end - start, 1e-9)
    output_tokens = sum(r["output_tokens"] for r in done)
    input_tokens = sum(r["input_len"] for r in done)

    def good(r) -> bool:
        times = r["token_times_s"]
        if not times:
            return False
        if args.slo_ttft is not None and times[0] - r["sent_s"] > args.slo_ttft:
            return False
        if args.slo_tpot is not None and len(times) > 1 and \
                (times[-1] - times[0]) / (len(times) - 1) > args.slo_tpot:
            return False
        return True

    goodput = sum(good(r) for r in done)
    reported = [r for r in done if r["cached_tokens"] is not None]  # servers that report the prefix cache's share
    cached = sum(r["cached_tokens"] for r in reported)
    return {
        "prefix_cache_hit_rate": cached / max(sum(r["input_len"] for r in reported), 1) if reported else None,
        "duration_s": window,
        "request_throughput_req_s": len(done) / window,
        "output_throughput_tok_s": output_tokens / window,
        "total_token_throughput_tok_s": (input_tokens + output_tokens) / window,
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "ttft_s": summarize(ttft), "tpot_s": summarize(tpot), "itl_s": summarize(itl), "e2e_s": summarize(e2e),
        "goodput": {"slo_ttft_s": args.slo_ttft, "slo_tpot_s": args.slo_tpot, "requests": goodput,
                    "req_s": goodput / window, "fraction_of_sent": goodput / len(records) if records else None},
    }


def plot_cdfs(records: list[dict], path: Path, args, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r["ok"] and r["token_times_s"]]
    series = {
        "TTFT (s)": ([r["token_times_s"][0] - r["sent_s"] for r in done], args.slo_ttft),
        "TPOT (s)": ([(r["token_times_s"][-1] - r["token_times_s"][0]) / (len(r["token_times_s"]) - 1)
                      for r in done if len(r["token_times_s"]) > 1], args.slo_tpot),
        "end-to-end latency (s)": ([r["token_times_s"][-1] - r["sent_s"] for r in done], None),
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, (values, slo)) in zip(axes, series.items()):
        values = sorted(values)
        if values:
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post")
        if slo is not None:
            ax.axvline(slo, color="red", linestyle="--", linewidth=1, label=f"SLO {slo:g}")
            ax.legend(fontsize=8)
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo, hi = int(lo), int(hi)
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO:HI with 0 <= LO < HI")
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--model", default=None, help="the `model` field (default: none, the server's own)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="Azure CSV or Mooncake JSONL")
    source.add_argument("--closed", type=int, metavar="N", help="N identical requests sent at once, no trace")
    parser.add_argument("--input-len", type=int, default=1024, help="prompt tokens of each --closed request")
    parser.add_argument("--output-len", type=int, default=256, help="output tokens of each --closed request")
    parser.add_argument("--skip", type=int, default=0, help="start at this request of the trace")
    parser.add_argument("--max-requests", type=int, default=100, help="send at most this many requests")
    parser.add_argument("--duration", type=float, default=None,
                        help="send only requests arriving in the first this many seconds of the replay")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="replay arrivals this many times faster")
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrivals at this rate (req/s) instead")
    parser.add_argument("--seed", type=int, default=0, help="prompts and Poisson arrivals")
    parser.add_argument("--max-input-len", type=int, default=None, help="clip prompt lengths")
    parser.add_argument("--max-output-len", type=int, default=None, help="clip output lengths")
    parser.add_argument("--prompt-mode", choices=("token-ids", "text"), default="token-ids")
    parser.add_argument("--prefix-blocks", action="store_true",
                        help="Mooncake traces: prompts from hash_ids (equal ids, equal 512-token blocks; "
                             "bench/prefix_trace.py), so the server's prefix cache meets the trace's sharing")
    parser.add_argument("--token-id-range", type=_range, default=(3, 200), metavar="LO:HI",
                        help="prompt token ids are drawn from [LO, HI) (default 3:200, valid for any vocabulary "
                             "of the tests' tiny model and up)")
    parser.add_argument("--text-word", default="hello", help="prompt word in text mode")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--schema-share", type=float, default=0.0,
                        help="this share of the requests (spread evenly) asks for bench/structured.py's JSON schema")
    parser.add_argument("--top-p", type=float, default=None, help="sent only when given")
    parser.add_argument("--no-extensions", action="store_true",
                        help="omit min_tokens, ignore_eos, return_token_ids (plain OpenAI servers)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--slo-ttft", type=float, default=None, help="seconds, for goodput")
    parser.add_argument("--slo-tpot", type=float, default=None, help="seconds per output token, for goodput")
    parser.add_argument("--out", default="out/bench_serving.json", help="JSON report")
    parser.add_argument("--plot", default=None, help="PNG of latency CDFs (default: --out with .png)")
    args = parser.parse_args(argv)

    try:
        if args.closed is not None:
            if args.closed < 1 or args.input_len < 1 or args.output_len < 1:
                raise ValueError("--closed, --input-len and --output-len must be >= 1")
            trace = [TraceRequest(0.0, args.input_len, args.output_len)] * args.closed
        else:
            trace = read_trace(args.trace, limit=args.max_requests, skip=args.skip)
        args.hash_ids = None
        if args.prefix_blocks:
            if args.trace is None or trace_format(args.trace) != "mooncake":
                raise ValueError("--prefix-blocks needs a Mooncake trace (.jsonl with hash_ids)")
            args.hash_ids = read_hash_ids(args.trace, limit=args.max_requests, skip=args.skip)
        requests, clipping = select(trace, rate_scale=args.rate_scale, poisson_rate=args.rate, seed=args.seed,
                                    max_input_len=args.max_input_len, max_output_len=args.max_output_len,
                                    duration_s=args.duration)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import resource  # one connection per request in flight: lift the soft open-files limit (often 1024)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    records, wall, t0_monotonic = asyncio.run(replay(args, requests))
    failures: dict[str, int] = {}
    for r in records:
        if not r["ok"]:
            failures[r["reason"]] = failures.get(r["reason"], 0) + 1
    completed = sum(r["ok"] for r in records)
    report = {
        "url": args.url, "model": args.model, "trace": str(args.trace), "skip": args.skip,
        "arrivals": (f"closed batch of {args.closed}" if args.closed is not None
                     else f"poisson {args.rate} req/s" if args.rate else f"trace x{args.rate_scale}"),
        "prompt_mode": args.prompt_mode, "extensions": not args.no_extensions,
        "sent": len(records), "completed": completed, "failed": len(records) - completed,
        "failures": failures, "clipped": {"input": clipping.input_clipped, "output": clipping.output_clipped},
        "wall_s": wall, "t0_monotonic": t0_monotonic, **metrics(records, args), "requests": records,
    }
    assert report["sent"] == report["completed"] + report["failed"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    name = f"{Path(args.trace).name} [{args.skip}:{args.skip + len(records)}]" if args.trace else \
        f"{args.closed} x ({args.input_len} in, {args.output_len} out)"
    plot_cdfs(records, plot, args, f"{name}, {report['arrivals']}, {args.url}")
    summary = {k: v for k, v in report.items() if k != "requests"}
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} and {plot}")
    return 0 if report["failed"] == 0 else 1
