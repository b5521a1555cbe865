"""Two GPUs for real: correctness over NCCL, the transport's round trip, disaggregated against
colocated throughput and the planner's prediction of it; the command line of
megatron_lamina/bench/two_gpu.py (`--help` says what each part measures).

    python tools/bench_two_gpu.py --out two_gpu.json
    python tools/bench_two_gpu.py --skip-tests --stage-graphs   # model worker on stage graphs
"""

import sys

from megatron_lamina.bench.two_gpu import main

if __name__ == "__main__":
    sys.exit(main())
