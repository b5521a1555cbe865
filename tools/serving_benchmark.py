"""The whole serving benchmark of one GPU machine in one command (issue #12's figures): a random
checkpoint, the server's start-up, closed batch and trace replay, the batch job and the decode
step; the command line of megatron_lamina/bench/serving_benchmark.py (`--help` says each phase).

    python3 tools/serving_benchmark.py --out-dir $OUT              # on the device machine
    python3 tools/serving_benchmark.py --phases server --trace-requests 300 ...
"""

import sys

from megatron_lamina.bench.serving_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
