"""Reads a Hugging Face LLaMA-family checkpoint directory (`--source hf`).

Supports model_type llama, mistral and qwen2, with weights in safetensors or
`pytorch_model*.bin` files, single or sharded (`*.index.json`). The architecture comes from
config.json (+ generation_config.json for the eos ids); every weights file is opened and its
tensors' shapes and dtypes checked against it (`validate`) before any is read; then tensors
are read one at a time (safetensors handles, memory-mapped .bin) and fused into the canonical
layout by `layout.canonical_tensors`. Registered in `readers.READERS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from megatron_lamina.architecture import ModelArchitecture
from megatron_lamina.checkpoint.errors import CheckpointInputError, expect_directory, open_safetensors
from megatron_lamina.checkpoint.layout import canonical_tensors
from megatron_lamina.checkpoint.validate import (
    StoredTensor,
    build_architecture,
    check_part_tensors,
    positive_int,
    read_json_object,
    stored_tensor,
)
from megatron_lamina.checkpoint.writer import DTYPES

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# Source names of the parts `layout.canonical_tensors` asks for ("model." prefix included).
HF_PART_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "output": "lm_head.weight",
    "attn_norm": "model.layers.{layer}.input_layernorm.weight",
    "q": "model.layers.{layer}.self_attn.q_proj.weight",
    "k": "model.layers.{layer}.self_attn.k_proj.weight",
    "v": "model.layers.{layer}.self_attn.v_proj.weight",
    "q_bias": "model.layers.{layer}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{layer}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{layer}.self_attn.v_proj.bias",
    "o": "model.layers.{layer}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{layer}.post_attention_layernorm.weight",
    "gate": "model.layers.{layer}.mlp.gate_proj.weight",
    "up": "model.layers.{layer}.mlp.up_proj.weight",
    "down": "model.layers.{layer}.mlp.down_proj.weight",
}
# config.json's names of the architecture's fields, for errors (RoPE's depend on the version).
HF_KEYS = {"num_layers": "num_hidden_layers", "num_kv_heads": "num_key_value_heads", "eos_token_ids": "eos_token_id"}
_LAYER_INDEX = re.compile(r"(?:model\.)?layers\.(\d+)\.")


class HFCheckpointReader:
    def __init__(self, path: Path):
        self.path = path.absolute()
        expect_directory(path, "a Hugging Face model directory")
        self._open_files: dict[str, Any] = {}
        self._config_path = self.path / "config.json"
        self.config, self.architecture, self.notes = read_hf_architecture(self._config_path)
        self._weight_map, self._weights_kind = self._index_weights()
        self._part_name = hf_part_name(self._weight_map)
        check_hf_tensors(self.architecture, self._stored_tensors(), self._config_path, self.path)
        if not any((self.path / name).is_file() for name in TOKENIZER_FILES):
            raise CheckpointInputError(
                self.path, f"no tokenizer ({' / '.join(TOKENIZER_FILES)}); copy the model's tokenizer files here"
            )
        source_dtype = self.config.get("dtype") or self.config.get("torch_dtype")
        self.default_dtype = source_dtype if source_dtype in DTYPES else "float32"

    # -- weights -----------------------------------------------------------------------------

    def _index_weights(self) -> tuple[dict[str, str], str]:
        """tensor name -> file name, and "safetensors" or "bin"."""
        for kind, single, index in (
            ("safetensors", "model.safetensors", "model.safetensors.index.json"),
            ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
        ):
            if (self.path / index).is_file():
                weight_map = read_json_object(self.path / index, "a weight index").get("weight_map")
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise CheckpointInputError(self.path / index, "no weight_map of tensor names to file names")
                return weight_map, kind
            if (self.path / single).is_file():
                return {name: single for name in self._file(single, kind).keys()}, kind
        raise CheckpointInputError(
            self.path, "no weights (model.safetensors, model.safetensors.index.json, pytorch_model*.bin)"
        )

    def _file(self, file_name: str, kind: str | None = None) -> Any:
        """An open weights file with .keys() and lazy per-tensor access."""
        cache = self._open_files
        if file_name not in cache:
            path = self.path / file_name
            if not path.is_file():
                raise CheckpointInputError(path, "listed in the weight index but missing")
            if (kind or self._weights_kind) == "safetensors":
                cache[file_name] = open_safetensors(path)
            else:
                cache[file_name] = _load_bin(path)
        return cache[file_name]

    def _stored_tensors(self) -> dict[str, StoredTensor]:
        """Every tensor's shape and dtype from its file's header (every file is opened: a
        missing or truncated shard fails here)."""
        held = {file_name: set(self._file(file_name).keys()) for file_name in set(self._weight_map.values())}
        stored = {}
        for name, file_name in self._weight_map.items():
            path, handle = self.path / file_name, self._file(file_name)
            if name not in held[file_name]:
                raise CheckpointInputError(path, f"lacks {name}, which the weight index lists")
            if self._weights_kind == "safetensors":
                piece = handle.get_slice(name)
                stored[name] = StoredTensor(tuple(piece.get_shape()), piece.get_dtype(), path)
            else:
                stored[name] = stored_tensor(handle[name], name, path)
        return stored

    def _read_part(self, part: str, layer: int | None) -> torch.Tensor:
        name = self._part_name(part, layer)
        handle = self._file(self._weight_map[name])
        return handle.get_tensor(name) if self._weights_kind == "safetensors" else handle[name]

    def tensors(self):
        return canonical_tensors(self.architecture, self._read_part)

    # -- tokenizer, provenance ---------------------------------------------------------------

    def save_tokenizer(self, output_dir: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        tokenizer.save_pretrained(str(output_dir))

    def provenance(self) -> dict[str, Any]:
        info = {
            "kind": "hf",
            "path": str(self.path),
            "model_type": self.config["model_type"],
            "weights": self._weights_kind,
        }
        if self.notes:
            info["notes"] = self.notes
        return info


def hf_part_name(names: Collection[str]) -> Callable[[str, int | None], str]:
    """How a Hugging Face save holding tensors `names` names each part: HF_PART_NAMES, without
    the "model." prefix where it was saved from the bare LlamaModel (it holds embed_tokens.weight
    and no model.embed_tokens.weight). Also used by the DeepSpeed reader."""
    bare = "model.embed_tokens.weight" not in names and "embed_tokens.weight" in names

    def name_of(part: str, layer: int | None) -> str:
        name = HF_PART_NAMES[part].format(layer=layer)
        return name.removeprefix("model.") if bare else name

    return name_of


def check_hf_tensors(arch: ModelArchitecture, stored: dict[str, StoredTensor], config_path: Path, where: Path) -> None:
    """The stored tensors of a Hugging Face model are what `arch` (from `config_path`) needs
    (validate.check_part_tensors). Also used by the DeepSpeed reader."""
    check_part_tensors(arch, stored, hf_part_name(stored), _LAYER_INDEX, f"{config_path.name}'s num_hidden_layers",
                       where, {"lm_head.weight": f" (tie_word_embeddings is false in {config_path.name})"})


def read_hf_architecture(config_path: Path) -> tuple[dict[str, Any], ModelArchitecture, list[str]]:
    """(config.json's dict, the architecture, notes on adjustments) of a Hugging Face model's
    config.json (+ generation_config.json beside it for the eos ids). Also used by the
    DeepSpeed reader for the models that Hugging Face Trainer checkpoints."""
    reader = _HFConfig(config_path)
    return reader.config, reader.read_architecture(), reader.notes


class _HFConfig:
    def __init__(self, config_path: Path):
        self._config_path = config_path
        self.path = config_path.parent
        self.config = read_json_object(config_path, "a Hugging Face model config")
        self.notes: list[str] = []

    def read_architecture(self) -> ModelArchitecture:
        c, where = self.config, self._config_path
        model_type = c.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointInputError(
                where, f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if c.get("hidden_act", "silu") != "silu":
            raise CheckpointInputError(where, f"hidden_act {c['hidden_act']!r} is not supported (only silu)")
        if c.get("mlp_bias"):
            raise CheckpointInputError(where, "mlp_bias=true is not supported")
        if model_type != "qwen2" and c.get("attention_bias"):
            raise CheckpointInputError(where, "attention_bias=true (biases on q/k/v and o_proj) is not supported")
        if model_type == "qwen2" and c.get("use_sliding_window"):
            raise CheckpointInputError(where, "use_sliding_window=true is not supported")

        missing = [k for k in REQUIRED_KEYS if k not in c]
        if missing:
            raise CheckpointInputError(where, f"lacks {', '.join(missing)}")
        max_positions = positive_int(c.get("max_position_embeddings", 4096), "max_position_embeddings", where)
        sliding_window = c.get("sliding_window") if model_type == "mistral" else None
        if sliding_window is not None and positive_int(sliding_window, "sliding_window", where) < max_positions:
            # Within the window, sliding-window attention is full attention: capping the
            # context keeps the model exact.
            self.notes.append(f"max_position_embeddings {max_positions} capped to sliding_window {sliding_window}")
            max_positions = sliding_window
        rope_theta, rope_scaling, rope_keys = self._read_rope()
        generation_path = self.path / "generation_config.json"
        generation = read_json_object(generation_path, "a generation config") if generation_path.is_file() else {}
        eos_ids = _as_list(generation.get("eos_token_id")) + _as_list(c.get("eos_token_id"))
        bos = c.get("bos_token_id")
        return build_architecture(
            where,
            {**HF_KEYS, **rope_keys},
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            num_kv_heads=c.get("num_key_value_heads"),
            head_dim=c.get("head_dim"),
            max_position_embeddings=max_positions,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2",
            bos_token_id=bos if bos is not None else generation.get("bos_token_id"),
            eos_token_ids=list(dict.fromkeys(eos_ids)),
        )

    def _read_rope(self) -> tuple[Any, dict[str, Any] | None, dict[str, str]]:
        """(rope_theta, rope_scaling's fields, their keys in config.json) as config.json gives
        them; `build_architecture` checks the values."""
        # transformers >= 5 writes "rope_parameters" (theta included); older "rope_theta" and
        # "rope_scaling" (with "type" before "rope_type").
        c = self.config
        section = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
        params = c.get(section) or {}
        if not isinstance(params, dict):
            raise CheckpointInputError(self._config_path, f"{section} is {params!r}, expected an object")
        keys = {"rope_scaling": section, "rope_theta": f"{section}.rope_theta" if "rope_theta" in params else "rope_theta"}
        theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            return theta, None, keys
        if rope_type != "llama3":
            raise CheckpointInputError(
                self._config_path, f"rope type {rope_type!r} is not supported (supported: default, llama3)"
            )
        return theta, params, keys


class _BinFile:
    """A torch.save'd state dict, memory-mapped where the file format allows it."""

    def __init__(self, path: Path):
        try:
            self._tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            self._tensors = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(self._tensors, dict):
            raise ValueError(f"holds a {type(self._tensors).__name__}, not a state dict")

    def keys(self):
        return self._tensors.keys()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def _load_bin(path: Path) -> _BinFile:
    try:
        return _BinFile(path)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointInputError(path, f"cannot read as a PyTorch state dict ({e})") from None


def _as_list(value: Any) -> list[Any]:
    """An eos_token_id (one id or a list), as a list; `build_architecture` checks the ids."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]
