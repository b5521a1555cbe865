"""Names, shapes and fused layouts of the canonical checkpoint's tensors.

The writer takes the expected tensor list and shapes from `canonical_tensor_shapes`; readers
of unfused LLaMA-style sources (Hugging Face, GGUF) hand their per-projection tensors to
`canonical_tensors`, which fuses Q/K/V into Megatron's grouped layout and gate/up into
`linear_fc1`; the loader and the tests undo the fusion with `split_qkv`. The layout itself is
documented in `megatron_lamina.architecture`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from megatron_lamina.architecture import ModelArchitecture

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"


def layer_prefix(layer: int) -> str:
    return f"decoder.layers.{layer}"


def canonical_tensor_shapes(arch: ModelArchitecture) -> dict[str, tuple[int, ...]]:
    """Every tensor of the canonical checkpoint, in file order, with its shape."""
    qkv_rows = (arch.num_attention_heads + 2 * arch.num_kv_heads) * arch.head_dim
    shapes = {EMBEDDING: (arch.vocab_size, arch.hidden_size)}
    for i in range(arch.num_layers):
        p = layer_prefix(i)
        shapes[f"{p}.input_layernorm.weight"] = (arch.hidden_size,)
        shapes[f"{p}.self_attention.linear_qkv.weight"] = (qkv_rows, arch.hidden_size)
        if arch.qkv_bias:
            shapes[f"{p}.self_attention.linear_qkv.bias"] = (qkv_rows,)
        shapes[f"{p}.self_attention.linear_proj.weight"] = (
            arch.hidden_size,
            arch.num_attention_heads * arch.head_dim,
        )
        shapes[f"{p}.pre_mlp_layernorm.weight"] = (arch.hidden_size,)
        shapes[f"{p}.mlp.linear_fc1.weight"] = (2 * arch.intermediate_size, arch.hidden_size)
        shapes[f"{p}.mlp.linear_fc2.weight"] = (arch.hidden_size, arch.intermediate_size)
    shapes[FINAL_NORM] = (arch.hidden_size,)
    if not arch.tie_word_embeddings:
        shapes[OUTPUT_LAYER] = (arch.vocab_size, arch.hidden_size)
    return shapes


# FP8 weights (`lamina convert --weight-dtype fp8_e4m3`): these linear weights are stored
# as e4m3, each beside a float32 scale per output channel (row) named `<weight>_scale`; the
# other tensors (norms, embeddings, the LM head) keep the checkpoint's dtype.
FP8_LINEAR_WEIGHTS = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                      "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
WEIGHT_SCALE = ".weight_scale"


def is_fp8_linear(name: str) -> bool:
    return name.endswith(FP8_LINEAR_WEIGHTS)


def scale_name(weight: str) -> str:
    """'decoder.layers.0.mlp.linear_fc1.weight' -> '... .linear_fc1.weight_scale'."""
    return weight.removesuffix(".weight") + WEIGHT_SCALE


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArchitecture) -> torch.Tensor:
    """[q; k; v] rows (weights or biases) -> Megatron's grouped layout: per KV group, its
    query heads' rows, then its key head's rows, then its value head's rows."""
    groups, d = arch.num_kv_heads, arch.head_dim
    rest = q.shape[1:]
    q = q.reshape(groups, arch.queries_per_kv_head * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, arch: ModelArchitecture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`; also works on one TP rank's shard if `arch` counts that rank's
    heads only."""
    groups, d, qpk = arch.num_kv_heads, arch.head_dim, arch.queries_per_kv_head
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (qpk + 2) * d, *rest)
    q, k, v = grouped.split([qpk * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


# The unfused parts a LLaMA-style source provides, in Hugging Face layout ([out, in] weights,
# rotate-half RoPE rows). Layer parts are read as read_part(part, layer).
LAYER_PARTS = ("attn_norm", "q", "k", "v", "q_bias", "k_bias", "v_bias", "o", "mlp_norm", "gate", "up", "down")
MODEL_PARTS = ("embed", "final_norm", "output")


def source_parts(arch: ModelArchitecture) -> list[tuple[str, int | None]]:
    """The (part, layer) pairs `canonical_tensors` reads for `arch` (layer None: a model part)."""
    parts = [("embed", None), ("final_norm", None)] + ([] if arch.tie_word_embeddings else [("output", None)])
    layer_parts = [p for p in LAYER_PARTS if arch.qkv_bias or not p.endswith("_bias")]
    return parts + [(p, i) for i in range(arch.num_layers) for p in layer_parts]


def part_shapes(arch: ModelArchitecture) -> dict[str, tuple[int, ...]]:
    """The shape of each unfused part (one layer's, for layer parts) in Hugging Face layout."""
    hidden, q_rows, kv_rows = arch.hidden_size, arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return {
        "embed": (arch.vocab_size, hidden), "final_norm": (hidden,), "output": (arch.vocab_size, hidden),
        "attn_norm": (hidden,), "q": (q_rows, hidden), "k": (kv_rows, hidden), "v": (kv_rows, hidden),
        "q_bias": (q_rows,), "k_bias": (kv_rows,), "v_bias": (kv_rows,), "o": (hidden, q_rows),
        "mlp_norm": (hidden,), "gate": (arch.intermediate_size, hidden), "up": (arch.intermediate_size, hidden),
        "down": (hidden, arch.intermediate_size),
    }  # fmt: skip


def canonical_tensors(
    arch: ModelArchitecture, read_part: Callable[[str, int | None], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the canonical tensors in file order, reading one source layer part at a time."""
    yield EMBEDDING, read_part("embed", None)
    for i in range(arch.num_layers):
        p = layer_prefix(i)
        yield f"{p}.input_layernorm.weight", read_part("attn_norm", i)
        qkv = [read_part(part, i) for part in ("q", "k", "v")]
        yield f"{p}.self_attention.linear_qkv.weight", fuse_qkv(*qkv, arch)
        if arch.qkv_bias:
            qkv = [read_part(part, i) for part in ("q_bias", "k_bias", "v_bias")]
            yield f"{p}.self_attention.linear_qkv.bias", fuse_qkv(*qkv, arch)
        del qkv
        yield f"{p}.self_attention.linear_proj.weight", read_part("o", i)
        yield f"{p}.pre_mlp_layernorm.weight", read_part("mlp_norm", i)
        yield f"{p}.mlp.linear_fc1.weight", torch.cat([read_part("gate", i), read_part("up", i)])
        yield f"{p}.mlp.linear_fc2.weight", read_part("down", i)
    yield FINAL_NORM, read_part("final_norm", None)
    if not arch.tie_word_embeddings:
        yield OUTPUT_LAYER, read_part("output", None)
