"""The model architecture as the canonical checkpoint records it (DESIGN.md section 9).

`ModelArchitecture` is the one description of a LLaMA-family decoder that every part of the
system shares: the checkpoint readers fill it from their source format, the canonical writer
stores it as `config.json`, the model workers turn it into a Megatron `TransformerConfig`,
the attention workers size their KV cache from it and the config validator checks layouts
against it. It is a leaf module: it imports nothing from the rest of the package.

Canonical checkpoint directory:

    config.json         {"format": FORMAT, "architecture": {...these fields...},
                         "dtype": "float32|bfloat16|float16", "tokenizer": "tokenizer",
                         "source": {...free-form provenance...}}
    tokenizer/          Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json
                         with the chat template, special tokens)
    model.safetensors   unsharded tensors in Megatron-core parameter naming:
        embedding.word_embeddings.weight                       [vocab, hidden]
        decoder.layers.{i}.input_layernorm.weight              [hidden]
        decoder.layers.{i}.self_attention.linear_qkv.weight    [(heads + 2*kv_heads)*head_dim, hidden]
        decoder.layers.{i}.self_attention.linear_qkv.bias      (only when qkv_bias)
        decoder.layers.{i}.self_attention.linear_proj.weight   [hidden, heads*head_dim]
        decoder.layers.{i}.pre_mlp_layernorm.weight            [hidden]
        decoder.layers.{i}.mlp.linear_fc1.weight               [2*intermediate, hidden] (gate; up)
        decoder.layers.{i}.mlp.linear_fc2.weight               [hidden, intermediate]
        decoder.final_layernorm.weight                         [hidden]
        output_layer.weight                                    (only when not tied)

    The fused QKV rows follow Megatron's grouped layout: for each KV group g in order, the
    rows of its heads/kv_heads query heads, then its key head, then its value head. That is
    what makes a contiguous row slice the shard of one tensor-parallel rank. Q and K rows use
    the Hugging Face ("rotate half") RoPE convention.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "megatron-lamina/1"


@dataclass
class RopeScaling:
    """LLaMA-3 style frequency scaling of RoPE (rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclass
class ModelArchitecture:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        assert self.num_attention_heads % self.num_kv_heads == 0, "GQA needs heads % kv_heads == 0"

    @property
    def queries_per_kv_head(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArchitecture":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


def read_checkpoint_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Read and check `config.json` of a canonical checkpoint; returns the whole dict."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not a megatron-lamina checkpoint (no config.json); "
            "convert one with lamina convert (tools/convert_checkpoint.py)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); convert the checkpoint again") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {data.get('format')!r}, expected {FORMAT!r}")
    return data


def read_architecture(checkpoint_dir: str | Path) -> ModelArchitecture:
    return ModelArchitecture.from_dict(read_checkpoint_config(checkpoint_dir)["architecture"])
