"""Reads a Hugging Face LLaMA-family checkpoint directory (`--source hf`).

Supports model_type llama, mistral and qwen2, with weights in safetensors or
`pytorch_model*.bin` files, single or sharded (`*.index.json`). The architecture comes from
config.json (+ generation_config.json for the eos ids); tensors are read one at a time
(safetensors handles, memory-mapped .bin) and fused into the canonical layout by
`layout.canonical_tensors`. Registered in `readers.READERS`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_lamina.architecture import ModelArchitecture, RopeScaling
from megatron_lamina.checkpoint.errors import CheckpointInputError, expect_directory, open_safetensors
from megatron_lamina.checkpoint.layout import canonical_tensors
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


class HFCheckpointReader:
    def __init__(self, path: Path):
        self.path = path.absolute()
        expect_directory(path, "a Hugging Face model directory")
        self._open_files: dict[str, Any] = {}
        self._config_path = self.path / "config.json"
        self.config, self.architecture, self.notes = read_hf_architecture(self._config_path)
        self._weight_map, self._weights_kind = self._index_weights()
        # Saved from the bare LlamaModel: names lack the "model." prefix.
        self._strip_model_prefix = "model.embed_tokens.weight" not in self._weight_map and (
            "embed_tokens.weight" in self._weight_map
        )
        self._check_tensors_present()
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
                weight_map = _read_json(self.path / index, required=True).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise CheckpointInputError(self.path / index, "no weight_map")
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

    def _source_name(self, canonical_part: str, layer: int | None) -> str:
        name = HF_PART_NAMES[canonical_part].format(layer=layer)
        if self._strip_model_prefix and name.startswith("model."):
            name = name[len("model.") :]
        return name

    def _check_tensors_present(self) -> None:
        arch = self.architecture
        parts = ["embed", "final_norm"] + ([] if arch.tie_word_embeddings else ["output"])
        layer_parts = ["attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down"]
        layer_parts += ["q_bias", "k_bias", "v_bias"] if arch.qkv_bias else []
        needed = [self._source_name(p, None) for p in parts]
        needed += [self._source_name(p, i) for i in range(arch.num_layers) for p in layer_parts]
        missing = [name for name in needed if name not in self._weight_map]
        if missing:
            hint = " (tie_word_embeddings is false in config.json)" if "lm_head.weight" in missing else ""
            raise CheckpointInputError(
                self.path, f"weights lack {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}{hint}"
            )

    def _read_part(self, part: str, layer: int | None) -> torch.Tensor:
        name = self._source_name(part, layer)
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
        self.config = _read_json(config_path, required=True)
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
        heads = c["num_attention_heads"]
        max_positions = c.get("max_position_embeddings", 4096)
        sliding_window = c.get("sliding_window") if model_type == "mistral" else None
        if sliding_window is not None and sliding_window < max_positions:
            # Within the window, sliding-window attention is full attention: capping the
            # context keeps the model exact.
            self.notes.append(f"max_position_embeddings {max_positions} capped to sliding_window {sliding_window}")
            max_positions = sliding_window
        rope_theta, rope_scaling = self._read_rope()
        generation = _read_json(self.path / "generation_config.json", required=False)
        eos_ids = _as_list(generation.get("eos_token_id")) + _as_list(c.get("eos_token_id"))
        bos = c.get("bos_token_id")
        return ModelArchitecture(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_attention_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            max_position_embeddings=max_positions,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            bos_token_id=bos if bos is not None else generation.get("bos_token_id"),
            eos_token_ids=list(dict.fromkeys(eos_ids)),
        )

    def _read_rope(self) -> tuple[float, RopeScaling | None]:
        # transformers >= 5 writes "rope_parameters" (theta included); older "rope_theta" and
        # "rope_scaling" (with "type" before "rope_type").
        c = self.config
        params = c.get("rope_parameters") or c.get("rope_scaling") or {}
        theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            return float(theta), None
        if rope_type != "llama3":
            raise CheckpointInputError(
                self._config_path, f"rope type {rope_type!r} is not supported (supported: default, llama3)"
            )
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
        return float(theta), scaling


class _BinFile:
    """A torch.save'd state dict, memory-mapped where the file format allows it."""

    def __init__(self, path: Path):
        try:
            self._tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            self._tensors = torch.load(path, map_location="cpu", weights_only=True)

    def keys(self):
        return self._tensors.keys()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def _load_bin(path: Path) -> _BinFile:
    try:
        return _BinFile(path)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointInputError(path, f"cannot read as a PyTorch state dict ({e})") from None


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise CheckpointInputError(path, "no such file (expected a Hugging Face model directory)")
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointInputError(path, f"invalid JSON ({e})") from None


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
