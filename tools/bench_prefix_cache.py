"""The prefix-cache benchmark of one GPU (issue 25): the Mooncake conversation and synthetic
traces replayed with the cache off and on (`--help`). The program is
megatron_lamina/bench/prefix_replay.py.

    python3 tools/bench_prefix_cache.py --out-dir $OUT
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without pip install

from megatron_lamina.bench.prefix_replay import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
