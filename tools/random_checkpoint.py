"""Write a canonical megatron-lamina checkpoint with random weights for a model-shape preset.

    python tools/random_checkpoint.py --shape llama3-8b --dtype bfloat16 --device cuda --output /tmp/llama3-8b-random
    python tools/random_checkpoint.py --shape tiny --dtype float32 --output /tmp/tiny-random

For benchmarks and the planner's device validation, where only the shape matters; the
program is megatron_lamina/checkpoint/random_weights.py (which says how the values are
drawn). The server loads the result with `--set model.checkpoint=OUTPUT`.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from megatron_lamina.checkpoint.random_weights import write_random_checkpoint
from megatron_lamina.checkpoint.writer import DTYPES
from megatron_lamina.planner.shapes import PRESETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", help=f"shape preset: {', '.join(PRESETS)}")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the values are drawn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads drawing row blocks")
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.shape not in PRESETS:
        parser.error(f"--shape {args.shape!r}: not a preset ({', '.join(PRESETS)})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    started = time.time()
    try:
        out = write_random_checkpoint(args.output, args.shape, args.dtype, args.device, args.seed, args.threads,
                                      args.overwrite)
    except ValueError as e:  # CheckpointInputError is one: the output exists
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out} ({args.shape}, {args.dtype}, {size / 2**30:.2f} GiB) in {time.time() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
