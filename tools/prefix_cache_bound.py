"""The prompt tokens an LRU prefix cache of a given capacity could serve on a Mooncake trace
(its hash_ids, 512-token blocks), and without a limit: the bound a measured hit rate is held
against. The logic is megatron_lamina/bench/prefix_trace.py.

    python tools/prefix_cache_bound.py ../shared/traces/mooncake_conversation_trace.jsonl \\
        --capacity-tokens 500000 1000000 [--max-requests N] [--max-input-len N]
"""

import argparse
import json
import sys

from megatron_lamina.bench.prefix_trace import lru_hit_bound, read_hash_ids
from megatron_lamina.planner.trace import read_trace


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="a Mooncake JSONL trace with hash_ids")
    p.add_argument("--capacity-tokens", type=int, nargs="*", default=[], help="cache sizes, in tokens")
    p.add_argument("--max-requests", type=int, default=None)
    p.add_argument("--max-input-len", type=int, default=None, help="prompts clipped, as a replay clips them")
    args = p.parse_args(argv)
    try:
        trace = read_trace(args.trace, limit=args.max_requests)
        ids = read_hash_ids(args.trace, limit=args.max_requests)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    clip = args.max_input_len or max(r.input_len for r in trace)
    requests = [(i, min(r.input_len, clip)) for i, r in zip(ids, trace)]
    rows = [lru_hit_bound(requests, c) for c in [*args.capacity_tokens, None]]
    print(json.dumps({"trace": args.trace, "requests": len(requests), "bounds": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
