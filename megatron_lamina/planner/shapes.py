"""The shape of a LLaMA-family model, as the planner and the profiler need it.

A `ModelShape` is the part of `ModelArchitecture` that decides costs (sizes, head counts,
context) plus a name. It comes from a preset (`PRESETS`) or from a canonical checkpoint's
`config.json`, and derives what the cost model and the KV-capacity model use: parameters
per layer, weight bytes, KV bytes per token, bytes that cross the network per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from megatron_lamina.architecture import ModelArchitecture, read_architecture
from megatron_lamina.checkpoint.loader import padded_vocab_size


@dataclass(frozen=True)
class ModelShape:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    tie_word_embeddings: bool = False

    @property
    def queries_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_params(self) -> int:
        """Fused QKV projection of one layer."""
        return self.hidden_size * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def layer_params(self) -> int:
        """Weights of one transformer layer (QKV, output projection, gated MLP, two norms)."""
        out_proj = self.num_heads * self.head_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.qkv_params + out_proj + mlp + 2 * self.hidden_size

    @property
    def head_params(self) -> int:
        """Embedding, final norm and LM head (shared with the embedding when tied)."""
        tables = 1 if self.tie_word_embeddings else 2
        return tables * self.vocab_size * self.hidden_size + self.hidden_size

    @property
    def params(self) -> int:
        return self.num_layers * self.layer_params + self.head_params

    def weight_bytes(self, dtype_bytes: int) -> int:
        return self.params * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token over all layers and all KV heads."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def attention_in_bytes_per_token(self, dtype_bytes: int) -> int:
        """q, k, v of one token of one layer, all heads (model worker -> attention worker)."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim * dtype_bytes

    def attention_out_bytes_per_token(self, dtype_bytes: int) -> int:
        """The attention output of one token of one layer (attention worker -> model worker)."""
        return self.num_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelShape":
        return cls(**data)

    @classmethod
    def from_architecture(cls, name: str, arch: ModelArchitecture) -> "ModelShape":
        return cls(name, arch.vocab_size, arch.hidden_size, arch.intermediate_size, arch.num_layers,
                   arch.num_attention_heads, arch.num_kv_heads, arch.head_dim,
                   arch.max_position_embeddings, arch.tie_word_embeddings)

    def to_architecture(self) -> ModelArchitecture:
        """A `ModelArchitecture` of this shape (random weights: the profiler builds models from it)."""
        return ModelArchitecture(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, max_position_embeddings=self.max_context,
            tie_word_embeddings=self.tie_word_embeddings)

    def with_layers(self, num_layers: int) -> "ModelShape":
        return dataclasses.replace(self, num_layers=num_layers)

    def padded_vocab(self, tp: int) -> int:
        """The vocabulary padded as the engine builds `LlamaModel` for TP `tp` (the worker
        factory's rule, `checkpoint.loader.padded_vocab_size`: a multiple of tp)."""
        return padded_vocab_size(self.vocab_size, tp)

    def tp_shard(self, tp: int) -> "ModelShape":
        """What one rank of TP `tp` holds, as a shape to build at TP 1: the same hidden size and
        head dim, query heads, KV heads and MLP intermediate size / tp, and the LM head's (and
        embedding's) padded vocabulary / tp: exactly the GEMM shapes a TP rank runs
        (tools/profile_costs.py --emulate-tp)."""
        if tp == 1:
            return self
        for what, n in (("KV heads", self.num_kv_heads), ("query heads", self.num_heads),
                        ("MLP intermediate size", self.intermediate_size)):
            if n % tp:
                raise ValueError(f"TP {tp} does not divide the model's {n} {what}")
        return dataclasses.replace(self, name=f"{self.name}/tp{tp}-rank", num_heads=self.num_heads // tp,
                                   num_kv_heads=self.num_kv_heads // tp,
                                   intermediate_size=self.intermediate_size // tp,
                                   vocab_size=self.padded_vocab(tp) // tp)


PRESETS: dict[str, ModelShape] = {s.name: s for s in [
    # The tests' tiny random LLaMA (tests/tiny_models.py).
    ModelShape("tiny", 256, 64, 128, 2, 4, 2, 16, 256),
    ModelShape("smollm2-135m", 49152, 576, 1536, 30, 9, 3, 64, 8192, tie_word_embeddings=True),
    ModelShape("llama3-8b", 128256, 4096, 14336, 32, 32, 8, 128, 8192),
    ModelShape("llama3.1-8b", 128256, 4096, 14336, 32, 32, 8, 128, 131072),
    ModelShape("llama3-70b", 128256, 8192, 28672, 80, 64, 8, 128, 8192),
    ModelShape("llama3.1-70b", 128256, 8192, 28672, 80, 64, 8, 128, 131072),
]}


def load_shape(spec: str) -> ModelShape:
    """A preset name, or a canonical checkpoint directory (its config.json)."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.is_dir():
        return ModelShape.from_architecture(path.resolve().name, read_architecture(path))
    raise ValueError(f"model shape {spec!r}: not a preset ({', '.join(PRESETS)}) and not a "
                     "canonical checkpoint directory (tools/convert_checkpoint.py writes one)")
