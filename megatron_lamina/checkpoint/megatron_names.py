"""Megatron parameter names -> canonical tensor names, for every Megatron naming we read.

Three namings reach us: Megatron-core's local layer spec (the canonical naming itself),
its Transformer-Engine spec (norms fused into the next linear layer: `layer_norm_weight`),
and the pre-core "legacy" model of older Megatron-LM and Megatron-DeepSpeed
(`language_model.encoder.layers.N.self_attention.query_key_value.weight`, ...). All three
lay out the fused QKV rows and the SwiGLU fc1 rows the same way, so renaming is all there is.
Trainers built on Megatron that wrap the model (DDP's `module.`, a `model.` attribute) save
the same names under that prefix; it is dropped first (`strip_wrappers`).
`canonical_name` is called by the Megatron readers (torch_dist, mp_rank) and the DeepSpeed
reader for each stored name.
"""

from __future__ import annotations

import re

from megatron_lamina.checkpoint.layout import EMBEDDING, FINAL_NORM, OUTPUT_LAYER

# Prefixes of model tensors; everything else (optimizer., rng_state, ...) is not ours to read.
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "language_model.")
# Buffers and Transformer-Engine metadata stored next to the weights.
IGNORED_SUFFIXES = ("_extra_state", "inv_freq")
# Prefixes of a wrapped model (DistributedDataParallel's `module.`, a trainer's `model.`).
WRAPPER_PREFIXES = ("module.", "model.")

TOP_LEVEL = {
    "embedding.word_embeddings.weight": EMBEDDING,
    "decoder.final_layernorm.weight": FINAL_NORM,
    "output_layer.weight": OUTPUT_LAYER,
    "language_model.embedding.word_embeddings.weight": EMBEDDING,
    "language_model.encoder.final_norm.weight": FINAL_NORM,
    "language_model.encoder.final_layernorm.weight": FINAL_NORM,
    "language_model.transformer.final_layernorm.weight": FINAL_NORM,
    "language_model.output_layer.weight": OUTPUT_LAYER,
}
# Name of a layer tensor after `decoder.layers.N.` (or the legacy equivalent) -> canonical.
LAYER_SUFFIXES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # Transformer Engine
    "input_norm.weight": "input_layernorm.weight",  # legacy Megatron-LM
    "self_attention.linear_qkv.weight": "self_attention.linear_qkv.weight",
    "self_attention.query_key_value.weight": "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias": "self_attention.linear_qkv.bias",
    "self_attention.query_key_value.bias": "self_attention.linear_qkv.bias",
    "self_attention.linear_proj.weight": "self_attention.linear_proj.weight",
    "self_attention.dense.weight": "self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",  # Transformer Engine
    "post_attention_norm.weight": "pre_mlp_layernorm.weight",  # legacy Megatron-LM
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",  # Megatron-DeepSpeed
    "mlp.linear_fc1.weight": "mlp.linear_fc1.weight",
    "mlp.dense_h_to_4h.weight": "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight": "mlp.linear_fc2.weight",
    "mlp.dense_4h_to_h.weight": "mlp.linear_fc2.weight",
}
# `decoder.layers.N.` / `language_model.encoder.layers.N.`; torch_dist stores layers stacked
# along a leading axis under `decoder.layers.` with no N.
_LAYER = re.compile(r"(?:decoder|language_model\.(?:encoder|transformer))\.layers\.(?:(\d+)\.)?(.+)")


def strip_wrappers(name: str) -> str:
    """`module.model.decoder.layers...` -> `decoder.layers...`: wrapper prefixes before a Megatron
    name are dropped (a name that is no Megatron name under them is kept as it is)."""
    stripped = name
    while stripped.startswith(WRAPPER_PREFIXES):
        stripped = stripped.split(".", 1)[1]
        if stripped.startswith(MODEL_PREFIXES):
            return stripped
    return name


def is_model_tensor(name: str) -> bool:
    name = strip_wrappers(name)
    return name.startswith(MODEL_PREFIXES) and not name.endswith(IGNORED_SUFFIXES)


def canonical_name(name: str) -> str:
    """The canonical name of Megatron tensor `name` (wrapper prefixes allowed); for torch_dist's
    stacked layer tensors a template with `{layer}` in place of the layer index. Raises
    KeyError for a name we cannot serve."""
    name = strip_wrappers(name)
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    match = _LAYER.fullmatch(name)
    if not match or match.group(2) not in LAYER_SUFFIXES:
        raise KeyError(name)
    layer = "{layer}" if match.group(1) is None else match.group(1)
    return f"decoder.layers.{layer}.{LAYER_SUFFIXES[match.group(2)]}"


def split_layer(canonical: str) -> tuple[int | None, str]:
    """decoder.layers.3.mlp.linear_fc1.weight -> (3, "mlp.linear_fc1.weight"); top-level
    names -> (None, name)."""
    match = _LAYER.fullmatch(canonical)
    if match is None or match.group(1) is None:
        return None, canonical
    return int(match.group(1)), match.group(2)
