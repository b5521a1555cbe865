"""The prefix-cache benchmark of one GPU (issue 25): Mooncake trace windows replayed with the
cache off, on, and on with a host tier, each cached mode's window after a warm-up that fills
the cache (`--help`). The program is megatron_lamina/bench/prefix_replay.py;
tools/predict_prefix_cache.py predicts the same replay on the CPU.

    python3 tools/bench_prefix_cache.py --out-dir $OUT --traces conversation --modes off,on,host \
        --skip 6000 --warmup 250 --requests 200 --set kv_cache.num_blocks=20000 --host-cache-gib 64
"""

import sys

from megatron_lamina.bench.prefix_replay import main

if __name__ == "__main__":
    sys.exit(main())
