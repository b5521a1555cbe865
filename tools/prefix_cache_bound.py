"""The prompt tokens an LRU prefix cache of a given capacity could serve on a Mooncake trace
(its hash_ids, 512-token blocks), and without a limit: the bound a measured hit rate is held
against. The program is megatron_lamina/bench/prefix_trace.py (`bound_main`).

    python tools/prefix_cache_bound.py ../shared/traces/mooncake_conversation_trace.jsonl \\
        --capacity-tokens 500000 1000000 [--max-requests N] [--max-input-len N] \\
        [--skip S --warmup W]     # a window of N requests from S, after the W before it
"""

import sys

from megatron_lamina.bench.prefix_trace import bound_main

if __name__ == "__main__":
    sys.exit(bound_main())
