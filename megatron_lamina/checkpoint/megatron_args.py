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

import json
from pathlib import Path
from typing import Any

from megatron_lamina.architecture import ModelArchitecture, RopeScaling
from megatron_lamina.checkpoint.errors import CheckpointInputError

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
    path = Path(path)
    if not path.is_file():
        raise CheckpointInputError(path, "no such file (expected a JSON object of Megatron arguments)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointInputError(path, f"invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointInputError(path, "expected a JSON object of Megatron arguments")
    return data


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
    hidden, heads = args["hidden_size"], args["num_attention_heads"]
    grouped = args.get("group_query_attention")  # Megatron-LM sets num_query_groups=1 without GQA
    if grouped is None:  # Megatron-DeepSpeed, hand-written configs: num_query_groups alone says it
        grouped = args.get("num_query_groups") is not None
    kv_heads = args["num_query_groups"] if grouped and args.get("num_query_groups") else heads
    ffn = args.get("ffn_hidden_size") or int((4 * hidden * 2 / 3) / 64) * 64  # Megatron-LM's swiglu default
    max_positions = args.get("max_position_embeddings") or args.get("seq_length")
    if not max_positions:
        raise CheckpointInputError(where, "no training arguments give max_position_embeddings or seq_length")
    padded = args.get("padded_vocab_size")
    if padded is not None and vocab_size > padded:
        raise CheckpointInputError(
            where, f"the tokenizer has {vocab_size} tokens, more than the model's padded vocabulary of {padded}"
        )
    rope_scaling = None
    if args.get("use_rope_scaling"):
        rope_scaling = RopeScaling(
            factor=float(args.get("rope_scaling_factor") or 8.0),
            low_freq_factor=LLAMA3_LOW_FREQ_FACTOR,
            high_freq_factor=LLAMA3_HIGH_FREQ_FACTOR,
            original_max_position_embeddings=LLAMA3_ORIGINAL_CONTEXT,
        )
    try:
        return ModelArchitecture(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=ffn,
            num_layers=args["num_layers"],
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=args.get("kv_channels") or hidden // heads,
            max_position_embeddings=max_positions,
            rms_norm_eps=float(get("norm_epsilon")),
            rope_theta=float(get("rotary_base")),
            rope_scaling=rope_scaling,
            tie_word_embeddings=not get("untie_embeddings_and_output_weights"),
            qkv_bias=bool(get("add_qkv_bias")),
            bos_token_id=bos_token_id,
            eos_token_ids=eos_token_ids,
        )
    except AssertionError as e:
        raise CheckpointInputError(where, f"inconsistent arguments: {e}") from None


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
    if float(get("rotary_percent")) != 1.0:
        raise unsupported(f"partial rotary embeddings (rotary_percent {get('rotary_percent')})")
    for name, what in UNSUPPORTED_WHEN_SET.items():
        if args.get(name):
            raise unsupported(what)
