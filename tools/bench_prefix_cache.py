"""The prefix-cache benchmark of one GPU (issue 25): the Mooncake conversation and synthetic
traces replayed with the cache off and on (`--help`). The program is
megatron_lamina/bench/prefix_replay.py.

    python3 tools/bench_prefix_cache.py --out-dir $OUT
"""

import sys

from megatron_lamina.bench.prefix_replay import main

if __name__ == "__main__":
    sys.exit(main())
