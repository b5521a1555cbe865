"""Reads a Megatron-LM / Megatron-core checkpoint (`--source megatron`).

`--input` is a save directory (with `latest_checkpointed_iteration.txt`, whose iteration is
read) or one `iter_NNNNNNN` / `release` directory. Two formats are read:
    torch_dist  Megatron-core distributed checkpoints (`metadata.json`, `*.distcp`), through
                `megatron.core.dist_checkpointing` (`megatron_torch_dist`)
    torch       legacy `mp_rank_TT[_PPP]/model_optim_rng.pt` files, tensor- and
                pipeline-parallel shards merged (`megatron_legacy`)
Megatron's own layout is the canonical one (module names, grouped fused QKV, fc1 = [gate; up]
once TP shards are merged), so tensors are only renamed, merged and cut to the tokenizer's
vocabulary (Megatron pads it to a multiple of make_vocab_size_divisible_by x TP).

The architecture comes from the training arguments stored in the checkpoint, overridden by
`--model-config` (`megatron_args`). The checkpoint has no tokenizer: `--tokenizer` names a
SentencePiece model or a Hugging Face tokenizer dir; without it, the `tokenizer_model` of
the training arguments is used if that file exists. Registered in `readers.READERS`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from megatron_lamina.architecture import ModelArchitecture
from megatron_lamina.checkpoint.errors import CheckpointInputError, expect_directory
from megatron_lamina.checkpoint.layout import EMBEDDING, OUTPUT_LAYER, canonical_tensor_shapes
from megatron_lamina.checkpoint.megatron_args import (
    architecture_from_args,
    default_dtype,
    merged_args,
    read_model_config,
)
from megatron_lamina.checkpoint.megatron_legacy import LegacyShards, is_legacy_checkpoint
from megatron_lamina.checkpoint.megatron_names import split_layer
from megatron_lamina.checkpoint.tokenizer_files import TokenizerSource
from megatron_lamina.checkpoint.validate import StoredTensor, check_layer_count, check_stored_tensors

if TYPE_CHECKING:
    import torch

LATEST_FILE = "latest_checkpointed_iteration.txt"
# Megatron tokenizer_type -> whether its encoding starts with BOS (our tokenizer must agree).
ADDS_BOS = {"Llama2Tokenizer": True, "GPTSentencePieceTokenizer": False}


class MegatronTensors(Protocol):
    """Whole (TP-merged, PP-renumbered) Megatron tensors by canonical name:
    `megatron_torch_dist.TorchDistTensors`, `megatron_legacy.LegacyShards`, the DeepSpeed
    reader for Megatron-DeepSpeed models."""

    def names(self) -> set[str]: ...

    def stored(self, name: str) -> StoredTensor:
        """The shape and dtype `tensor(name)` will have, without reading its data."""
        ...

    def tensor(self, name: str) -> torch.Tensor: ...


class MegatronCheckpointReader:
    def __init__(self, path: Path, tokenizer: Path | None = None, model_config: Path | None = None):
        self.path = path.absolute()
        expect_directory(path, "a Megatron checkpoint directory")
        self.iteration_dir = _iteration_dir(self.path)
        self._layout: dict[str, int] = {}  # the legacy save's parallel sizes, for provenance
        if (self.iteration_dir / "metadata.json").is_file():
            from megatron_lamina.checkpoint.megatron_torch_dist import TorchDistTensors

            self.format = "torch_dist"
            dist_tensors = TorchDistTensors(self.iteration_dir)
            stored_args, args_file = dist_tensors.common.get("args"), self.iteration_dir / "common.pt"
            self.iteration = dist_tensors.common.get("iteration")
            self._source: MegatronTensors = dist_tensors
        elif is_legacy_checkpoint(self.iteration_dir):
            self.format = "torch"
            shards = LegacyShards(self.iteration_dir)
            stored_args, args_file, self.iteration = shards.args, shards.first_file, shards.iteration
            self._layout = {"tensor_parallel": shards.tp_size, "pipeline_parallel": shards.pp_size}
            self._source = shards
        else:
            raise CheckpointInputError(
                self.iteration_dir,
                "neither a Megatron distributed checkpoint (metadata.json) nor a legacy one (mp_rank_* directories)",
            )
        args = merged_args(stored_args, read_model_config(model_config) if model_config else None)
        self._tokenizer = self._open_tokenizer(tokenizer, args)
        self.architecture = architecture_from_args(
            args,
            args_file if stored_args is not None else Path(model_config or self.iteration_dir),
            vocab_size=self._tokenizer.vocab_size,
            bos_token_id=self._tokenizer.bos_token_id,
            eos_token_ids=self._tokenizer.eos_token_ids,
        )
        self.default_dtype = default_dtype(args)
        check_megatron_tensors(self.architecture, self._source, self.iteration_dir)

    def _open_tokenizer(self, tokenizer: Path | None, args: dict[str, Any]) -> TokenizerSource:
        if tokenizer is None and args.get("tokenizer_model") and Path(args["tokenizer_model"]).exists():
            tokenizer = Path(args["tokenizer_model"])
        if tokenizer is None:
            raise CheckpointInputError(
                self.path,
                "no tokenizer: pass --tokenizer (a SentencePiece tokenizer.model or a Hugging Face tokenizer dir)",
            )
        return TokenizerSource(tokenizer, add_bos=ADDS_BOS.get(args.get("tokenizer_type")))

    def tensors(self):
        return megatron_canonical_tensors(self.architecture, self._source)

    def save_tokenizer(self, output_dir: Path) -> None:
        self._tokenizer.save(output_dir)

    def provenance(self) -> dict[str, Any]:
        return {
            "kind": "megatron",
            "format": self.format,
            "path": str(self.iteration_dir),
            "iteration": self.iteration,
            "tokenizer": str(self._tokenizer.path),
            **self._layout,
        }


def check_megatron_tensors(arch: ModelArchitecture, source: MegatronTensors, where: Path) -> None:
    """Fail before writing anything unless the stored tensors (by canonical name) are exactly
    what `arch` needs (a tied model may also store an output layer), floating point and of
    the architecture's shapes (the vocabulary rows padded)."""
    names = source.names()
    check_layer_count(arch.num_layers, (layer for name in names if (layer := split_layer(name)[0]) is not None),
                      "num_layers", where)
    shapes = canonical_tensor_shapes(arch)
    expected = set(shapes)
    found = names - ({OUTPUT_LAYER} if arch.tie_word_embeddings else set())
    missing = sorted(expected - found, key=_natural)
    if missing:
        hint = " (untie_embeddings_and_output_weights is set)" if missing == [OUTPUT_LAYER] else ""
        raise CheckpointInputError(
            where, f"no tensor for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}{hint}"
        )
    unexpected = sorted(found - expected, key=_natural)
    if unexpected:
        raise CheckpointInputError(
            where,
            f"tensors {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''} do not fit the "
            f"architecture ({arch.num_layers} layers, qkv_bias={arch.qkv_bias})",
        )
    check_stored_tensors(shapes, {name: source.stored(name) for name in shapes}, padded_rows=(EMBEDDING, OUTPUT_LAYER))


def megatron_canonical_tensors(arch: ModelArchitecture, source: MegatronTensors) -> Iterator[tuple[str, torch.Tensor]]:
    """The canonical tensors in file order from `source.tensor(canonical_name)` (whole, TP-merged
    Megatron tensors), the padded vocabulary cut to the tokenizer's."""
    for name in canonical_tensor_shapes(arch):
        tensor = source.tensor(name)
        yield name, tensor[: arch.vocab_size] if name in (EMBEDDING, OUTPUT_LAYER) else tensor


def _iteration_dir(path: Path) -> Path:
    """A save directory's latest iteration (Megatron-LM's tracker file), else `path` itself."""
    latest = path / LATEST_FILE
    if not latest.is_file():
        return path
    text = latest.read_text().strip()
    if text == "release":
        iteration_dir = path / "release"
    elif text.isdigit():
        iteration_dir = path / f"iter_{int(text):07d}"
    else:
        raise CheckpointInputError(latest, f"holds {text!r}, not an iteration number or 'release'")
    if not iteration_dir.is_dir():
        raise CheckpointInputError(iteration_dir, f"missing (named by {LATEST_FILE})")
    return iteration_dir


def _natural(name: str) -> tuple:
    """Sort key putting decoder.layers.2 before decoder.layers.10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))
