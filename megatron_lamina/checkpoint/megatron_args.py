"""Megatron training arguments -> `ModelArchitecture`, for Megatron and Megatron-DeepSpeed sources.

Megatron-LM stores its argparse `Namespace` in every checkpoint (`args`); Megatron-DeepSpeed
stores it in the DeepSpeed model-states file. `--model-config FILE.json` gives the same
arguments by hand (Megatron-LM argument names with `_` or `-`, e.g. `{"num_layers": 32}`)
and overrides the stored ones. Missing arguments take Megatron-LM's own defaults, so a
hand-written config of a LLaMA-style model names at least `normalization`, `swiglu`,
`position_embedding_type` and `add_bias_linear`; what this system cannot serve (LayerNorm,
biases on every linear layer, learned positions, MoE, ...) fails with the argument's name.
Used by `megatron_reader` and `deepspeed_reader`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_lamina.architecture import ModelArchitecture
from megatron_lamina.checkpoint.errors import CheckpointInputError
from megatron_lamina.checkpoint.validate import build_architecture, positive_int, read_json_object

# Megatron-DeepSpeed / older Megatron-LM names -> current Megatron-LM names.
ALIASES = {
    "num_key_value_heads": "num_query_groups",
    "layernorm_epsilon": "norm_epsilon",
    "rope_theta": "rotary_base",
}
# Megatron-LM's defaults for the arguments that decide whether we can serve the model.
DEFAULTS = {
    "normalization": "LayerNorm",
    "swiglu": False,
    "position_embedding_type": "learned_absolute",
    "add_bias_linear": True,
    "add_qkv_bias": False,
    "untie_embeddings_and_output_weights": False,
    "norm_epsilon": 1e-5,
    "rotary_base": 10000,
    "rotary_percent": 1.0,
}
# Arguments whose being set (true, non-zero) means a model this system cannot serve.
UNSUPPORTED_WHEN_SET = {
    "rotary_interleaved": "interleaved-pair RoPE (rotary_interleaved)",
    "apply_layernorm_1p": "zero-centered norm weights (apply_layernorm_1p)",
    "qk_layernorm": "QK layer norms",
    "multi_latent_attention": "multi-latent attention",
    "apply_residual_connection_post_layernorm": "post-norm residuals",
    "num_experts": "mixture-of-experts layers",
}
# Megatron's LLaMA-3.1 RoPE scaling hard-codes all but the factor.
LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR, LLAMA3_ORIGINAL_CONTEXT = 1.0, 4.0, 8192


def read_model_config(path: Path) -> dict[str, Any]:
    """Read `--model-config`: a JSON object of Megatron argument names -> values."""
    return read_json_object(Path(path), "a JSON object of Megatron arguments")


def merged_args(stored: Any, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint's `args` (a Namespace, dict or None) updated by `overrides`, with
    argument names normalized (`--num-layers` -> `num_layers`) and aliases resolved."""
    args = dict(vars(stored)) if stored is not None and not isinstance(stored, dict) else dict(stored or {})
    args.update({k.lstrip("-").replace("-", "_"): v for k, v in (overrides or {}).items()})
    for alias, name in ALIASES.items():
        if args.get(alias) is not None and args.get(name) is None:
            args[name] = args[alias]
    return args


def default_dtype(args: dict[str, Any]) -> str:
    return "bfloat16" if args.get("bf16") else "float16" if args.get("fp16") else "float32"


def architecture_from_args(
    args: dict[str, Any], where: Path, vocab_size: int, bos_token_id: int | None, eos_token_ids: list[int]
) -> ModelArchitecture:
    """`where` names the file the arguments came from, for error messages."""

    def get(name: str) -> Any:
        value = args.get(name)
        return DEFAULTS.get(name) if value is None else value

    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if args.get(k) is None]
    if missing:
        raise CheckpointInputError(
            where,
            f"no training arguments give {', '.join(missing)}; pass --model-config with Megatron arguments, "
            'e.g. {"num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, ...}',
        )
    _check_supported(args, where, get)
    hidden = positive_int(args["hidden_size"], "hidden_size", where)
    heads = args["num_attention_heads"]
    grouped = args.get("group_query_attention")  # Megatron-LM sets num_query_groups=1 without GQA
    if grouped is None:  # Megatron-DeepSpeed, hand-written configs: num_query_groups alone says it
        grouped = args.get("num_query_groups") is not None
    kv_heads = args["num_query_groups"] if grouped and args.get("num_query_groups") is not None else None
    ffn = args.get("ffn_hidden_size") or int((4 * hidden * 2 / 3) / 64) * 64  # Megatron-LM's swiglu default
    max_positions = args.get("max_position_embeddings") or args.get("seq_length")
    if not max_positions:
        raise CheckpointInputError(where, "no training arguments give max_position_embeddings or seq_length")
    padded = args.get("padded_vocab_size")
    if padded is not None and vocab_size > positive_int(padded, "padded_vocab_size", where):
        raise CheckpointInputError(
            where, f"the tokenizer has {vocab_size} tokens, more than the model's padded vocabulary of {padded}"
        )
    rope_scaling = None
    if args.get("use_rope_scaling"):
        rope_scaling = {
            "factor": args.get("rope_scaling_factor") or 8.0,
            "low_freq_factor": LLAMA3_LOW_FREQ_FACTOR,
            "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
            "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT,
        }
    keys = {"intermediate_size": "ffn_hidden_size", "num_kv_heads": "num_query_groups", "head_dim": "kv_channels",
            "max_position_embeddings": "max_position_embeddings" if args.get("max_position_embeddings") else "seq_length",
            "rms_norm_eps": "norm_epsilon", "rope_theta": "rotary_base", "rope_scaling": "rope_scaling_factor",
            "vocab_size": "the tokenizer's vocabulary size", "bos_token_id": "the tokenizer's BOS id",
            "eos_token_ids": "the tokenizer's EOS id"}  # fmt: skip
    return build_architecture(
        where,
        keys,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=args["num_layers"],
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=args.get("kv_channels"),
        max_position_embeddings=max_positions,
        rms_norm_eps=get("norm_epsilon"),
        rope_theta=get("rotary_base"),
        rope_scaling=rope_scaling,
        tie_word_embeddings=not get("untie_embeddings_and_output_weights"),
        qkv_bias=bool(get("add_qkv_bias")),
        bos_token_id=bos_token_id,
        eos_token_ids=eos_token_ids,
    )


def _check_supported(args: dict[str, Any], where: Path, get) -> None:
    def unsupported(what: str) -> CheckpointInputError:
        return CheckpointInputError(where, f"{what} is not supported (a LLaMA-style decoder is)")

    if str(get("normalization")).lower() != "rmsnorm":
        raise unsupported(f"normalization {get('normalization')!r}")
    if not get("swiglu"):
        raise unsupported("an MLP without SwiGLU (swiglu false)")
    rope = str(get("position_embedding_type")).lower().endswith(("rope", "rotary")) or args.get(
        "use_rotary_position_embeddings"
    )
    if not rope:
        raise unsupported(f"position_embedding_type {get('position_embedding_type')!r}")
    if get("add_bias_linear"):
        raise unsupported("add_bias_linear (biases on every linear layer; only QKV biases are)")
    if get("rotary_percent") != 1.0:
        raise unsupported(f"partial rotary embeddings (rotary_percent {get('rotary_percent')})")
    for name, what in UNSUPPORTED_WHEN_SET.items():
        if args.get(name):
            raise unsupported(what)
