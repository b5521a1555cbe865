"""Structured outputs' cost on one device (issue 27): the closed batch with half the requests under
a JSON schema against the same batch without, and a schema's compile time first and cached.

    python3 tools/bench_structured.py --out-dir $OUT            # random llama3-8b weights, SmolLM2's tokenizer

The logic is megatron_lamina/bench/structured.py. Writes OUT_DIR/bench_structured.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megatron_lamina.bench.structured import run, use_tokenizer
from megatron_lamina.checkpoint.random_weights import write_random_checkpoint
from megatron_lamina.planner.shapes import load_shape

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="out/structured")
    p.add_argument("--config", default=str(ROOT / "configs" / "gpu-colocated.yaml"))
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--nproc", type=int, default=1, help="ranks the config's layout has")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--shape", default="llama3-8b", help="random weights of this shape (random_weights.py)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--checkpoint", default="/tmp/lamina-random-ckpt", help="written unless it exists")
    p.add_argument("--tokenizer", type=Path, default=ROOT / "checkpoints" / "smollm2-135m-instruct" / "tokenizer",
                   help="a Hugging Face tokenizer put in the checkpoint (xgrammar needs a real vocabulary)")
    p.add_argument("--closed", type=int, default=256)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--schema-share", type=float, default=0.5)
    p.add_argument("--ready-timeout", type=float, default=900.0)
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[bench_structured {time.monotonic() - started:7.1f}s] {message}", flush=True)

    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").exists():
        log(f"writing random {args.shape} weights to {checkpoint}")
        write_random_checkpoint(checkpoint, args.shape, args.dtype, args.device, overwrite=True)
    use_tokenizer(checkpoint, args.tokenizer)
    args.vocab_size = load_shape(args.shape).vocab_size  # the bitmask's width
    args.set = [f"model.checkpoint={checkpoint}", *(args.set or [])]
    result = run(args, out, log)
    (out / "bench_structured.json").write_text(json.dumps(result, indent=1))
    log(f"wrote {out / 'bench_structured.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
