"""Benchmarks (b) and (c): the model-worker step and the colocated decode step on random bf16
weights, against the roofline; the command line of megatron_lamina/bench/decode_benchmark.py
(`--help` says what is timed).

    python tools/bench_decode.py --batches 64,128,256 --contexts 1024,4096 --out decode.json
    torchrun --nproc-per-node 2 tools/bench_decode.py ...   # colocated TP 2 over NCCL, one GPU a rank
"""

import sys

from megatron_lamina.bench.decode_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
