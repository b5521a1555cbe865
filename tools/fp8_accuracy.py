"""FP8 KV, FP8 weights and both against the unquantized model: prompt log-probabilities of a
held-out text and greedy agreement (megatron_lamina/bench/fp8_accuracy.py says how).

    python tools/fp8_accuracy.py                                   # the default model, CPU, float32
    python tools/fp8_accuracy.py --device cuda --dtype bfloat16    # a GPU (FP8 matmuls need Hopper)

Prints one markdown table (the one in docs/BENCHMARKS.md) and, with --output, writes it as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from megatron_lamina.bench.fp8_accuracy import CHATS, HELD_OUT_TEXT, markdown, measure
from megatron_lamina.checkpoint.auto_convert import canonical_checkpoint
from megatron_lamina.checkpoint.convert import quantize_checkpoint
from megatron_lamina.checkpoint.default_model import smollm2_gguf_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a canonical checkpoint, HF directory or GGUF file (default: the "
                        "default model, SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-tokens", type=int, default=256, help="greedy tokens per chat")
    parser.add_argument("--output", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    checkpoint = canonical_checkpoint(args.checkpoint or str(smollm2_gguf_path()))
    with tempfile.TemporaryDirectory(prefix="fp8-") as tmp:
        fp8 = quantize_checkpoint(checkpoint, Path(tmp) / "fp8")
        results = measure(checkpoint, fp8, max_tokens=args.max_tokens, device=args.device, dtype=args.dtype)
    from transformers import AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(str(Path(checkpoint) / "tokenizer"))(HELD_OUT_TEXT)["input_ids"]) - 1
    table = markdown(results, tokens, args.max_tokens, len(CHATS))
    print(table)
    if args.output:
        args.output.write_text(json.dumps({"device": args.device, "dtype": args.dtype, "checkpoint": str(checkpoint),
                                           "results": [dataclasses.asdict(r) for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
