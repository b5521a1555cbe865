"""Loads one tensor-parallel rank's shard of a canonical checkpoint into a Megatron model.

The worker factory builds a model worker's `LlamaModel` (model/llama.py) and calls
`CheckpointShardLoader(dir, tp_rank, tp_size, dtype).load_into(model)`. Each tensor is
sliced as Megatron shards it, reading only that slice from `model.safetensors` (safetensors
slices are lazy), so one unsharded checkpoint serves every TP size:

    word embeddings, output layer   rows, over the vocab padded to a multiple of tp_size
                                    (rows past the real vocab are zeros)
    linear_qkv weight/bias          contiguous row chunk t (whole KV groups, thanks to the
                                    grouped layout, given tp_size divides num_kv_heads)
    linear_fc1                      gate rows chunk t, then up rows chunk t
    linear_proj, linear_fc2         column chunk t
    norms                           replicated
    *.weight_scale (FP8 weights)    with their weight's rows: chunk t of linear_qkv's and
                                    linear_fc1's (gate chunk, up chunk), whole beside
                                    linear_proj and linear_fc2 (their rows are not split)

FP8 weights (e4m3, `lamina convert --weight-dtype fp8_e4m3`) and their float32 scales keep
their stored dtype; `dtype` converts the other tensors. With `quantize_fp8` (the config's
`model.weight_dtype: fp8_e4m3` over a bf16/fp32 checkpoint; `weight_format` decides) the
same four linear weights are quantized here, by the converter's own rule
(`fp8.quantize_weight`) over the WHOLE stored tensor, then sharded as a converted checkpoint's
weights and scales are: a row-parallel weight's scale is its whole row's, not its shard's,
so every TP size loads the numbers the FP8-converted checkpoint holds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_lamina.architecture import ModelArchitecture, read_checkpoint_config
from megatron_lamina.checkpoint.errors import CheckpointInputError, open_safetensors
from megatron_lamina.checkpoint.layout import EMBEDDING, OUTPUT_LAYER, WEIGHT_SCALE, is_fp8_linear, scale_name
from megatron_lamina.checkpoint.writer import MODEL_FILE
from megatron_lamina.fp8 import FP8, FP8_NAME, quantize_weight

# Transformer-Engine layer specs fuse the norm into the following linear layer; their
# parameter names map onto the canonical norm tensors.
_TE_NORM_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def padded_vocab_size(vocab_size: int, tp_size: int, make_vocab_size_divisible_by: int = 1) -> int:
    """The vocabulary padded to a multiple of `make_vocab_size_divisible_by * tp_size`, as
    Megatron pads it (the embedding and LM head rows are split evenly over the TP ranks)."""
    multiple = make_vocab_size_divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


class CheckpointShardLoader:
    def __init__(
        self,
        checkpoint_dir: str | Path,
        tp_rank: int = 0,
        tp_size: int = 1,
        dtype: torch.dtype | None = None,
        make_vocab_size_divisible_by: int = 1,
        quantize_fp8: bool = False,
    ):
        """`dtype` None keeps the stored dtype. The vocab is padded to a multiple of
        `make_vocab_size_divisible_by * tp_size`, as Megatron pads it. `quantize_fp8`: quantize
        the linear weights of an unquantized checkpoint at load (module docstring)."""
        self.checkpoint_dir = Path(checkpoint_dir)
        self.config = read_checkpoint_config(self.checkpoint_dir)
        self.arch = ModelArchitecture.from_dict(self.config["architecture"])
        assert 0 <= tp_rank < tp_size, f"tp_rank {tp_rank} out of range for tp_size {tp_size}"
        self.tp_rank, self.tp_size, self.dtype = tp_rank, tp_size, dtype
        for what, count in (
            ("num_kv_heads", self.arch.num_kv_heads),
            ("num_attention_heads", self.arch.num_attention_heads),
            ("intermediate_size", self.arch.intermediate_size),
        ):
            if count % tp_size:
                raise CheckpointInputError(
                    self.checkpoint_dir, f"tensor parallel size {tp_size} does not divide {what}={count}"
                )
        self.padded_vocab_size = padded_vocab_size(self.arch.vocab_size, tp_size, make_vocab_size_divisible_by)
        self.model_file = self.checkpoint_dir / MODEL_FILE
        if not self.model_file.is_file():
            raise CheckpointInputError(self.model_file, "missing; the checkpoint is incomplete")
        self._file = open_safetensors(self.model_file)
        self._names = set(self._file.keys())
        # Load-time FP8: each linear weight is quantized once, whole, when its weight or its
        # scale is first asked for (Megatron names a linear's weight, bias, then scale).
        self._quantize = {scale_name(n): n for n in self._names if is_fp8_linear(n)} if quantize_fp8 else {}
        self._quantize.update({n: n for n in self._quantize.values()})
        self._names |= set(self._quantize)
        self._quantized: tuple[str, dict[str, torch.Tensor]] | None = None

    def tensor(self, name: str) -> torch.Tensor:
        """This rank's shard of canonical tensor `name` (Megatron parameter naming)."""
        name = self._canonical_name(name)
        t, tp = self.tp_rank, self.tp_size
        if name in (EMBEDDING, OUTPUT_LAYER):
            shard = self._vocab_rows(name)
        elif name.endswith(("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                            "self_attention.linear_qkv.weight_scale")):
            rows = self._shape(name)[0] // tp
            shard = self._slice(name)[t * rows : (t + 1) * rows]
        elif name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.weight_scale")):
            half = self._shape(name)[0] // 2  # gate rows, then up rows
            rows = half // tp
            fc1 = self._slice(name)
            gate, up = fc1[t * rows : (t + 1) * rows], fc1[half + t * rows : half + (t + 1) * rows]
            shard = torch.cat([gate, up])
        elif name.endswith(("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")):
            cols = self._shape(name)[1] // tp
            shard = self._slice(name)[:, t * cols : (t + 1) * cols]
        else:
            shard = self._slice(name)[:]
        keeps_dtype = shard.dtype == FP8 or name.endswith(WEIGHT_SCALE)
        return shard if self.dtype is None or keeps_dtype else shard.to(self.dtype)

    def load_into(self, module: torch.nn.Module, strict: bool = True) -> None:
        """Copy this rank's shard into every parameter of `module`, matched by name.

        With `strict`, every checkpoint tensor must also be used by some parameter (catches a
        model built with fewer layers than the checkpoint has)."""
        used = set()
        for name, param in module.named_parameters():
            try:
                shard = self.tensor(name)
            except KeyError:
                raise CheckpointInputError(
                    self.model_file, f"no tensor for parameter {name} (shape {tuple(param.shape)})"
                ) from None
            if shard.shape != param.shape:
                raise CheckpointInputError(
                    self.model_file,
                    f"parameter {name} has shape {tuple(param.shape)}, but the checkpoint's TP rank "
                    f"{self.tp_rank}/{self.tp_size} shard has {tuple(shard.shape)}",
                )
            with torch.no_grad():
                param.copy_(shard)
            used.add(self._canonical_name(name))
        unused = sorted(self._names - used - ({OUTPUT_LAYER} if self.arch.tie_word_embeddings else set()))
        if strict and unused:
            raise CheckpointInputError(
                self.model_file,
                f"tensors not used by the model: {', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}",
            )

    def _canonical_name(self, name: str) -> str:
        for te_suffix, canonical_suffix in _TE_NORM_ALIASES.items():
            if name.endswith(te_suffix):
                name = name[: -len(te_suffix)] + canonical_suffix
        if name == OUTPUT_LAYER and self.arch.tie_word_embeddings:
            name = EMBEDDING
        if name not in self._names:
            raise KeyError(f"{self.model_file}: no tensor {name}")
        return name

    def _slice(self, name: str):
        """A lazy safetensors slice, or a load-time quantized tensor (sliced the same way)."""
        if name not in self._quantize:
            return self._file.get_slice(name)
        weight = self._quantize[name]
        if self._quantized is None or self._quantized[0] != weight:
            values, scales = quantize_weight(self._file.get_tensor(weight))
            self._quantized = (weight, {weight: values, scale_name(weight): scales})
        return self._quantized[1][name]

    def _shape(self, name: str) -> list[int]:
        return list(self._slice(name).shape) if name in self._quantize else self._slice(name).get_shape()

    def _vocab_rows(self, name: str) -> torch.Tensor:
        rows = self.padded_vocab_size // self.tp_size
        start, end = self.tp_rank * rows, (self.tp_rank + 1) * rows
        vocab = self.arch.vocab_size
        real = self._slice(name)[min(start, vocab) : min(end, vocab)]
        if real.shape[0] == rows:
            return real
        padded = torch.zeros((rows, real.shape[1]), dtype=real.dtype)
        padded[: real.shape[0]] = real
        return padded


def weight_format(weight_dtype: str | None, checkpoint_dir: str | Path) -> tuple[bool, bool]:
    """The config's `model.weight_dtype` against what the checkpoint holds: (the model's linear
    weights are FP8, they are quantized at load). A ConfigError for an FP8 checkpoint asked to
    serve bfloat16 (its unquantized weights are gone)."""
    stored_fp8 = read_checkpoint_config(checkpoint_dir).get("weight_dtype") == FP8_NAME
    if weight_dtype is None:
        return stored_fp8, False
    if weight_dtype == FP8_NAME:
        return True, not stored_fp8
    if stored_fp8:
        from megatron_lamina.config import ConfigError

        raise ConfigError(f"model.weight_dtype = {weight_dtype!r}: checkpoint {checkpoint_dir} holds FP8 weights "
                          f"(lamina convert --weight-dtype {FP8_NAME}); allowed values are {FP8_NAME} or null, "
                          "or serve the unquantized checkpoint")
    return False, False
