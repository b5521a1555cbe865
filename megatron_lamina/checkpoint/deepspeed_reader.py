"""Reads a DeepSpeed ZeRO (stage 1, 2 or 3) checkpoint (`--source deepspeed`).

`--input` is what `engine.save_checkpoint(dir)` wrote (`dir/latest` naming the tag, e.g.
`global_step500/`) or the tag directory itself; Hugging Face Trainer's `checkpoint-N/` is such
a dir with config.json and the tokenizer beside `latest`. The fp32 master weights, partitioned
over the data-parallel ranks' `*_optim_states.pt`, are consolidated by DeepSpeed's own
`deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` in lazy mode: files
are memory-mapped and each tensor is assembled when read, one at a time.

Two kinds of model are recognized by their parameter names:
    Hugging Face (model.embed_tokens.weight, ...)   architecture from config.json (in --input,
        its parent, or --model-config), tokenizer from the same directory or --tokenizer;
        tensors renamed and fused like `hf_reader`'s.
    Megatron-DeepSpeed (language_model.* / decoder.*)   architecture from the training args
        its save_checkpoint stores in the model-states file (or --model-config), tokenizer from
        --tokenizer; tensors renamed like `megatron_reader`'s.
zero_to_fp32 consolidates data-parallel shards only, so checkpoints of tensor- or
pipeline-parallel DeepSpeed runs (mp_rank_01..., layer_* files) are refused. The state files
are pickles (`weights_only=False`, as zero_to_fp32 loads them): convert only checkpoints you
trust. Registered in `readers.READERS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_lamina.checkpoint.errors import CheckpointInputError, expect_directory
from megatron_lamina.checkpoint.hf_reader import check_hf_tensors, hf_part_name, read_hf_architecture
from megatron_lamina.checkpoint.layout import canonical_tensors
from megatron_lamina.checkpoint.megatron_args import architecture_from_args, merged_args, read_model_config
from megatron_lamina.checkpoint.megatron_names import canonical_name, is_model_tensor
from megatron_lamina.checkpoint.megatron_reader import check_megatron_tensors, megatron_canonical_tensors
from megatron_lamina.checkpoint.tokenizer_files import TokenizerSource
from megatron_lamina.checkpoint.validate import StoredTensor, stored_tensor

# One model-states file per model-parallel rank; rank 0's name by ZeRO stage.
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


class DeepSpeedCheckpointReader:
    default_dtype = "float32"  # zero_to_fp32 returns the fp32 master weights

    def __init__(self, path: Path, tokenizer: Path | None = None, model_config: Path | None = None):
        self.path = path.absolute()
        expect_directory(path, "a DeepSpeed checkpoint directory")
        self.checkpoint_dir, self.tag = _checkpoint_dir_and_tag(self.path)
        self.tag_dir = self.checkpoint_dir / self.tag
        self.model_states_file = self._model_states_file()
        states = _torch_load(self.model_states_file)
        self.zero_stage = (states.get("ds_config") or {}).get("zero_optimization", {}).get("stage")
        self._state = self._consolidate()
        if any(name.endswith("embed_tokens.weight") for name in self._state):
            self.model_kind = "hf"
            self._open_hf(tokenizer, model_config)
        elif any(is_model_tensor(name) for name in self._state):
            self.model_kind = "megatron"
            self._open_megatron(states.get("args"), tokenizer, model_config)
        else:
            names = ", ".join(list(self._state)[:4])
            raise CheckpointInputError(
                self.model_states_file, f"parameters ({names} ...) are neither a Hugging Face nor a Megatron model's"
            )
        del states

    def _model_states_file(self) -> Path:
        for name in MODEL_STATES:
            if (self.tag_dir / name).is_file():
                break
        else:
            raise CheckpointInputError(self.tag_dir, f"no model states file ({' / '.join(MODEL_STATES)})")
        if any(self.tag_dir.glob("*mp_rank_01*")) or any(self.tag_dir.glob("layer_*")):
            raise CheckpointInputError(
                self.tag_dir,
                "a tensor- or pipeline-parallel DeepSpeed checkpoint (mp_rank_01 / layer_* files); zero_to_fp32 "
                "consolidates data-parallel shards only",
            )
        return self.tag_dir / name

    def _consolidate(self) -> dict[str, Any]:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(self.checkpoint_dir), tag=self.tag, lazy_mode=True)
        except (ValueError, FileNotFoundError, KeyError) as e:  # "Expected 2 of '*_optim_states.pt' ...", ...
            raise CheckpointInputError(self.tag_dir, f"cannot consolidate the ZeRO shards ({e})") from None

    # -- Hugging Face models -------------------------------------------------------------------

    def _open_hf(self, tokenizer: Path | None, model_config: Path | None) -> None:
        config_path = self._hf_config_path(model_config)
        self.config, self.architecture, self.notes = read_hf_architecture(config_path)
        self._hf_name = hf_part_name(self._state)
        stored = {name: stored_tensor(value, name, self.tag_dir) for name, value in self._state.items()}
        check_hf_tensors(self.architecture, stored, config_path, self.tag_dir)
        if tokenizer is None:
            tokenizer = config_path.parent  # Trainer saves the tokenizer beside config.json
        self._tokenizer = TokenizerSource(tokenizer)

    def _hf_config_path(self, model_config: Path | None) -> Path:
        if model_config is not None:
            return model_config / "config.json" if model_config.is_dir() else model_config
        for directory in (self.path, self.checkpoint_dir):
            if (directory / "config.json").is_file():
                return directory / "config.json"
        raise CheckpointInputError(
            self.checkpoint_dir, "no config.json for this Hugging Face model; pass --model-config CONFIG.json"
        )

    def _read_hf_part(self, part: str, layer: int | None) -> torch.Tensor:
        return self._state[self._hf_name(part, layer)].contiguous()  # assembles the lazy tensor

    # -- Megatron-DeepSpeed models -------------------------------------------------------------

    def _open_megatron(self, stored_args: Any, tokenizer: Path | None, model_config: Path | None) -> None:
        args = merged_args(stored_args, read_model_config(model_config) if model_config else None)
        if tokenizer is None:
            raise CheckpointInputError(
                self.path, "no tokenizer: pass --tokenizer (a SentencePiece tokenizer.model or a Hugging Face dir)"
            )
        self._tokenizer = TokenizerSource(tokenizer)
        where = self.model_states_file if stored_args is not None else Path(model_config or self.tag_dir)
        self.architecture = architecture_from_args(
            args, where, self._tokenizer.vocab_size, self._tokenizer.bos_token_id, self._tokenizer.eos_token_ids
        )
        self.notes = []
        self._megatron_names: dict[str, str] = {}  # canonical -> stored
        for stored in self._state:
            if not is_model_tensor(stored):
                continue
            try:
                self._megatron_names.setdefault(canonical_name(stored), stored)
            except KeyError:
                raise CheckpointInputError(
                    self.model_states_file, f"tensor {stored} is not supported (not a LLaMA-style layer)"
                ) from None
        check_megatron_tensors(self.architecture, self, self.tag_dir)

    def names(self) -> set[str]:
        return set(self._megatron_names)

    def stored(self, name: str) -> StoredTensor:
        return stored_tensor(self._state[self._megatron_names[name]], name, self.tag_dir)

    def tensor(self, name: str) -> torch.Tensor:
        """A Megatron-DeepSpeed tensor by canonical name (whole: one model-parallel rank)."""
        return self._state[self._megatron_names[name]].contiguous()

    # -- the reader interface ------------------------------------------------------------------

    def tensors(self):
        if self.model_kind == "hf":
            return canonical_tensors(self.architecture, self._read_hf_part)
        return megatron_canonical_tensors(self.architecture, self)

    def save_tokenizer(self, output_dir: Path) -> None:
        self._tokenizer.save(output_dir)

    def provenance(self) -> dict[str, Any]:
        info = {
            "kind": "deepspeed",
            "path": str(self.tag_dir),
            "zero_stage": self.zero_stage,
            "model": self.model_kind,
            "tokenizer": str(self._tokenizer.path),
        }
        if self.notes:
            info["notes"] = self.notes
        return info


def _checkpoint_dir_and_tag(path: Path) -> tuple[Path, str]:
    """(the dir holding `latest`, the tag) for a save dir or a tag dir."""
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not (path / tag).is_dir():
            raise CheckpointInputError(path / tag, "missing (named by the 'latest' file)")
        return path, tag
    if any(path.glob("*_optim_states.pt")):
        return path.parent, path.name
    raise CheckpointInputError(path, "not a DeepSpeed checkpoint (neither a 'latest' file nor *_optim_states.pt files)")


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        states = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointInputError(path, f"cannot read as a DeepSpeed model-states file ({e})") from None
    if not isinstance(states, dict):
        raise CheckpointInputError(path, f"holds a {type(states).__name__}, not a DeepSpeed model-states dict")
    return states
