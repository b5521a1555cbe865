"""Reads a llama.cpp GGUF file (`--source gguf`), dequantizing each tensor as it is read.

Supports general.architecture "llama" (LLaMA, Mistral, SmolLM, ... as llama.cpp converts them)
and "qwen2". The architecture comes from the GGUF metadata (`{arch}.*` keys, tokenizer ids),
and every tensor's type and shape are checked against it (`validate`) before any is read;
tensors are memory-mapped by `gguf.GGUFReader`, dequantized one at a time with
`gguf.quants.dequantize` and renamed to the canonical layout. Two llama.cpp conventions are
undone here: numpy shapes are ggml's `ne[]` reversed, so a weight reads as [out, in] as in
Hugging Face; and llama.cpp's converter permutes the Q and K rows of "llama" models for its
interleaved-pair RoPE, which `_undo_rope_permutation` reverts to the rotate-half convention.
Registered in `readers.READERS`.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_lamina.architecture import ModelArchitecture
from megatron_lamina.checkpoint.errors import CheckpointInputError, expect_file
from megatron_lamina.checkpoint.layout import canonical_tensors
from megatron_lamina.checkpoint.validate import StoredTensor, build_architecture, check_part_tensors

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Tensor types gguf.quants can dequantize to floats (integer types are not weights).
DEQUANTIZABLE_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
    "TQ1_0", "TQ2_0", "MXFP4",
)  # fmt: skip

# llama.cpp tensor names of the parts `layout.canonical_tensors` asks for.
GGUF_PART_NAMES = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "output": "output.weight",
    "attn_norm": "blk.{layer}.attn_norm.weight",
    "q": "blk.{layer}.attn_q.weight",
    "k": "blk.{layer}.attn_k.weight",
    "v": "blk.{layer}.attn_v.weight",
    "q_bias": "blk.{layer}.attn_q.bias",
    "k_bias": "blk.{layer}.attn_k.bias",
    "v_bias": "blk.{layer}.attn_v.bias",
    "o": "blk.{layer}.attn_output.weight",
    "mlp_norm": "blk.{layer}.ffn_norm.weight",
    "gate": "blk.{layer}.ffn_gate.weight",
    "up": "blk.{layer}.ffn_up.weight",
    "down": "blk.{layer}.ffn_down.weight",
}
_LAYER_INDEX = re.compile(r"blk\.(\d+)\.")
_KNOWN_TENSOR = re.compile(
    r"(token_embd|output_norm|output|rope_freqs)\.weight"
    r"|blk\.\d+\.(attn_norm|attn_q|attn_k|attn_v|attn_output|ffn_norm|ffn_gate|ffn_up|ffn_down)\.weight"
    r"|blk\.\d+\.attn_[qkv]\.bias"
)


def _gguf_name(part: str, layer: int | None) -> str:
    return GGUF_PART_NAMES[part].format(layer=layer)


class GGUFCheckpointReader:
    default_dtype = "float32"  # dequantized values exactly; --dtype bfloat16 halves the size

    def __init__(self, path: Path):
        self.path = path.absolute()
        expect_file(path, "a .gguf file")
        from gguf import GGUFReader

        try:
            self._reader = GGUFReader(self.path)
        except Exception as e:  # gguf raises ValueError / struct errors / ... on bad files
            raise CheckpointInputError(self.path, f"not a readable GGUF file ({e})") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.gguf_architecture = self._meta("general.architecture", required=True)
        if self.gguf_architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointInputError(
                self.path,
                f"GGUF architecture {self.gguf_architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
            )
        self._check_tensors()
        self.architecture = self._read_architecture()
        self._check_tensor_shapes()

    def _meta(self, key: str, default: Any = None, required: bool = False) -> Any:
        field = self._reader.fields.get(key)
        if field is None and required:
            raise CheckpointInputError(self.path, f"metadata key {key} is missing")
        return default if field is None else field.contents()

    def _check_tensors(self) -> None:
        if self._meta(f"{self.gguf_architecture}.expert_count", 0):
            raise CheckpointInputError(self.path, "mixture-of-experts models are not supported")
        unknown = [name for name in self._tensors if not _KNOWN_TENSOR.fullmatch(name)]
        if unknown:
            raise CheckpointInputError(
                self.path, f"unsupported tensors {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}"
            )
        for name, t in self._tensors.items():
            if t.tensor_type.name not in DEQUANTIZABLE_TYPES:
                raise CheckpointInputError(
                    self.path,
                    f"tensor {name} has type {t.tensor_type.name}, which cannot be dequantized; "
                    f"supported: {', '.join(DEQUANTIZABLE_TYPES)}",
                )
        rope_freqs = self._tensors.get("rope_freqs.weight")
        if rope_freqs is not None and not np.all(self._dequantize(rope_freqs) == 1.0):
            raise CheckpointInputError(
                self.path,
                "per-frequency RoPE factors (rope_freqs.weight, LLaMA-3.1 style scaling) are not supported "
                "from GGUF; convert the Hugging Face checkpoint instead",
            )

    def _read_architecture(self) -> ModelArchitecture:
        a = self.gguf_architecture
        rope_type = self._meta(f"{a}.rope.scaling.type", "none")
        if rope_type != "none":
            raise CheckpointInputError(self.path, f"rope scaling type {rope_type!r} is not supported")
        eos_ids = [self._meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        keys = {
            "vocab_size": f"{a}.vocab_size", "hidden_size": f"{a}.embedding_length",
            "intermediate_size": f"{a}.feed_forward_length", "num_layers": f"{a}.block_count",
            "num_attention_heads": f"{a}.attention.head_count", "num_kv_heads": f"{a}.attention.head_count_kv",
            "head_dim": f"{a}.attention.key_length", "max_position_embeddings": f"{a}.context_length",
            "rms_norm_eps": f"{a}.attention.layer_norm_rms_epsilon", "rope_theta": f"{a}.rope.freq_base",
            "bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_ids": "tokenizer.ggml.eos_token_id",
        }  # fmt: skip
        arch = build_architecture(
            self.path,
            keys,
            vocab_size=self._meta(keys["vocab_size"]) or len(self._meta("tokenizer.ggml.tokens", [])),
            hidden_size=self._meta(keys["hidden_size"], required=True),
            intermediate_size=self._meta(keys["intermediate_size"], required=True),
            num_layers=self._meta(keys["num_layers"], required=True),
            num_attention_heads=self._meta(keys["num_attention_heads"], required=True),
            num_kv_heads=self._meta(keys["num_kv_heads"]),
            head_dim=self._meta(keys["head_dim"]),
            max_position_embeddings=self._meta(keys["max_position_embeddings"], required=True),
            rms_norm_eps=self._meta(keys["rms_norm_eps"], 1e-5),
            rope_theta=self._meta(keys["rope_theta"], 10000.0),
            tie_word_embeddings="output.weight" not in self._tensors,
            qkv_bias="blk.0.attn_q.bias" in self._tensors,
            bos_token_id=self._meta(keys["bos_token_id"]),
            eos_token_ids=list(dict.fromkeys(i for i in eos_ids if i is not None)),
        )
        rotary_dim = self._meta(f"{a}.rope.dimension_count", arch.head_dim)
        if rotary_dim != arch.head_dim:
            raise CheckpointInputError(
                self.path, f"partial rotary embeddings (rope.dimension_count {rotary_dim} != head_dim {arch.head_dim})"
            )
        return arch

    def _check_tensor_shapes(self) -> None:
        """Every tensor the architecture needs is here, in its shape (types were checked by
        `_check_tensors`), from the header alone."""
        # ggml's ne[] is innermost-first: reversed, a weight reads [out, in] as in Hugging Face.
        stored = {name: StoredTensor(tuple(int(n) for n in reversed(t.shape)), None, self.path)
                  for name, t in self._tensors.items()}
        check_part_tensors(self.architecture, stored, _gguf_name, _LAYER_INDEX,
                           f"{self.gguf_architecture}.block_count", self.path)

    def _dequantize(self, t: Any) -> np.ndarray:
        from gguf.quants import dequantize

        values = dequantize(t.data, t.tensor_type)
        return values.reshape([int(n) for n in reversed(t.shape)])  # ggml ne[] is innermost-first

    def _read_part(self, part: str, layer: int | None) -> torch.Tensor:
        values = self._dequantize(self._tensors[_gguf_name(part, layer)])
        if self.gguf_architecture == "llama" and part in ("q", "k", "q_bias", "k_bias"):
            heads = self.architecture.num_attention_heads if part.startswith("q") else self.architecture.num_kv_heads
            values = _undo_rope_permutation(values, heads)
        return torch.from_numpy(np.array(values, dtype=np.float32))  # copy: the memmap is read-only

    def tensors(self):
        return canonical_tensors(self.architecture, self._read_part)

    def save_tokenizer(self, output_dir: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            str(self.path.parent), gguf_file=self.path.name, local_files_only=True
        )
        chat_template = self._meta("tokenizer.chat_template")
        if chat_template and not tokenizer.chat_template:
            tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(str(output_dir))

    def provenance(self) -> dict[str, Any]:
        return {
            "kind": "gguf",
            "path": str(self.path),
            "name": self._meta("general.name"),
            "architecture": self.gguf_architecture,
            "tensor_types": dict(Counter(t.tensor_type.name for t in self._tensors.values())),
        }


def _undo_rope_permutation(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter stores row j of each head's first half at 2j and row j of its
    second half at 2j+1 (interleaved pairs); put them back as [first half; second half]."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
