"""The prefix-cache benchmark (tools/bench_prefix_cache.py) predicted on the CPU by the
planner's simulator, for the same window arguments (`--help`). The program is
megatron_lamina/bench/prefix_predict.py.

    python tools/predict_prefix_cache.py --costs configs/planner/costs/h200-llama3-8b-tp1-graphs.json \
        --traces conversation --modes off,on,host --skip 6000 --warmup 250 --requests 200 \
        --set kv_cache.num_blocks=20000 --host-cache-gib 64
"""

import sys

from megatron_lamina.bench.prefix_predict import main

if __name__ == "__main__":
    sys.exit(main())
