"""The rules a source checkpoint must meet before the converter writes anything.

Every reader (`hf_reader`, `gguf_reader`, `megatron_*`, `deepspeed_reader`) checks what it read
with these functions, and the writer checks the weights' values as they stream past, so one
rule lives in one place:
    architecture   `build_architecture`: counts and sizes positive integers, eps and RoPE
                   values positive and finite, heads divisible by KV heads (and hidden_size
                   by heads where the head size is derived), token ids inside the vocabulary
    layers         `check_layer_count`: the architecture's layer count is the file's, checked
                   before anything loops over layers
    tensors        `check_stored_tensors`: each stored tensor floating point and of the shape
                   the architecture needs, from the files' headers, before any data is read;
                   `check_part_tensors` first: every part present, for the formats that name
                   each part (Hugging Face, GGUF)
    values         `check_finite`: no NaN or infinity, in a sample of each tensor (all of it
                   with `--check-all-weights`), as read and as written
A failure is a `CheckpointInputError` naming the file, the key or tensor and what was expected.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_lamina.architecture import ModelArchitecture, RopeScaling
from megatron_lamina.checkpoint.errors import CheckpointInputError
from megatron_lamina.checkpoint.layout import part_shapes, source_parts

# Elements checked per tensor by the default (sampled) finiteness check.
FINITE_SAMPLE = 1 << 16


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object (`what` says whose, for the error)."""
    if not path.is_file():
        raise CheckpointInputError(path, f"no such file (expected {what})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointInputError(path, f"invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointInputError(path, f"holds a JSON {_json_kind(data)}, expected an object ({what})")
    return data


# -- architecture ---------------------------------------------------------------------------


def positive_int(value: Any, key: str, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointInputError(where, f"{key} is {value!r}, expected a positive integer")
    return value


def positive_float(value: Any, key: str, where: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckpointInputError(where, f"{key} is {value!r}, expected a positive finite number")
    return float(value)


def _flag(value: Any, key: str, where: Path) -> bool:
    if not isinstance(value, bool):
        raise CheckpointInputError(where, f"{key} is {value!r}, expected true or false")
    return value


def build_architecture(where: Path, keys: Mapping[str, str] | None = None, **fields: Any) -> ModelArchitecture:
    """A `ModelArchitecture` from a source's raw values, each checked first.

    `fields` are ModelArchitecture's fields as the source gives them: `num_kv_heads` and
    `head_dim` None mean "not given" (all heads; hidden_size // num_attention_heads);
    `rope_scaling` is None or a dict of RopeScaling's fields; `eos_token_ids` a list.
    `keys` maps a field to the source's name for it (HF "num_hidden_layers" for num_layers),
    so that errors name what the user can find in the file `where`.
    """
    keys = keys or {}

    def key(name: str) -> str:
        return keys.get(name, name)

    counts = {}
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                 "max_position_embeddings"):  # fmt: skip
        counts[name] = positive_int(fields.pop(name), key(name), where)
    heads = counts["num_attention_heads"]
    kv_heads = fields.pop("num_kv_heads", None)
    kv_heads = heads if kv_heads is None else positive_int(kv_heads, key("num_kv_heads"), where)
    if heads % kv_heads:
        raise CheckpointInputError(
            where, f"{key('num_attention_heads')} {heads} is not a multiple of {key('num_kv_heads')} {kv_heads}"
        )
    head_dim = fields.pop("head_dim", None)
    if head_dim is None:
        if counts["hidden_size"] % heads:
            raise CheckpointInputError(
                where,
                f"{key('hidden_size')} {counts['hidden_size']} is not divisible by {key('num_attention_heads')} "
                f"{heads} (the head size is their quotient)",
            )
        head_dim = counts["hidden_size"] // heads
    head_dim = positive_int(head_dim, key("head_dim"), where)
    rope_scaling = fields.pop("rope_scaling", None)
    if rope_scaling is not None:
        rope_scaling = _rope_scaling(rope_scaling, key("rope_scaling"), where)
    vocab = counts["vocab_size"]
    bos = fields.pop("bos_token_id", None)
    eos = fields.pop("eos_token_ids", [])
    for value, name in [(bos, "bos_token_id")] * (bos is not None) + [(e, "eos_token_ids") for e in eos]:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise CheckpointInputError(
                where, f"{key(name)} {value!r} is not a token id of the vocabulary (0 to {vocab - 1})"
            )
    arch = ModelArchitecture(
        **counts,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=positive_float(fields.pop("rms_norm_eps"), key("rms_norm_eps"), where),
        rope_theta=positive_float(fields.pop("rope_theta"), key("rope_theta"), where),
        rope_scaling=rope_scaling,
        tie_word_embeddings=_flag(fields.pop("tie_word_embeddings"), key("tie_word_embeddings"), where),
        qkv_bias=_flag(fields.pop("qkv_bias"), key("qkv_bias"), where),
        bos_token_id=bos,
        eos_token_ids=list(eos),
    )
    assert not fields, f"unknown architecture fields {sorted(fields)}"
    return arch


def _rope_scaling(values: Any, key: str, where: Path) -> RopeScaling:
    if not isinstance(values, dict):
        raise CheckpointInputError(where, f"{key} is {values!r}, expected an object")
    names = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [name for name in names if name not in values]
    if missing:
        raise CheckpointInputError(where, f"{key} lacks {', '.join(missing)}")
    low = positive_float(values["low_freq_factor"], f"{key}.low_freq_factor", where)
    high = positive_float(values["high_freq_factor"], f"{key}.high_freq_factor", where)
    if high <= low:  # LLaMA-3 scaling divides by their difference
        raise CheckpointInputError(where, f"{key}.high_freq_factor {high} is not above low_freq_factor {low}")
    return RopeScaling(
        factor=positive_float(values["factor"], f"{key}.factor", where),
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=positive_int(
            values["original_max_position_embeddings"], f"{key}.original_max_position_embeddings", where
        ),
    )


def check_layer_count(num_layers: int, found: Iterable[int], key: str, where: Path) -> None:
    """The file's layers (indices found in its tensor names) are 0 .. num_layers-1; checked
    before anything is sized or looped by num_layers, which a hostile config sets to 10^12."""
    found = sorted(set(found))
    if len(found) != num_layers or found != list(range(num_layers)):  # len first: num_layers may be 10^12
        held = "no layers" if not found else (
            f"layers 0-{found[-1]}" if found == list(range(len(found))) else f"layers {_few(map(str, found))}"
        )
        raise CheckpointInputError(where, f"{key} is {num_layers}, but the weights hold {held}")


# -- stored tensors -------------------------------------------------------------------------


@dataclass
class StoredTensor:
    """What a file's header says of one tensor: its shape, its dtype (a torch dtype, a
    safetensors dtype name, or None where the reader checked the type itself: GGUF's
    dequantizable types) and the file holding it."""

    shape: tuple[int, ...]
    dtype: torch.dtype | str | None
    file: Path


def stored_tensor(value: Any, name: str, file: Path) -> StoredTensor:
    """A StoredTensor from a tensor-like value of a loaded state dict (torch tensor, DeepSpeed's
    lazy GatheredTensor); anything else stored under a weight's name is an error."""
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise CheckpointInputError(file, f"{name} holds a {type(value).__name__}, not a tensor")
    return StoredTensor(tuple(int(n) for n in value.shape), value.dtype, file)


def is_floating(dtype: torch.dtype | str) -> bool:
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return dtype == "BF16" or dtype.startswith("F")  # safetensors: F64 F32 F16 BF16 F8_*


def check_stored_tensors(
    expected: Mapping[str, tuple[int, ...]], stored: Mapping[str, StoredTensor], padded_rows: Iterable[str] = ()
) -> None:
    """Each name of `expected` (all present in `stored`) is floating point and of its shape;
    a name in `padded_rows` may have more rows (Megatron's padded vocabulary, cut when read)."""
    padded_rows = set(padded_rows)
    for name, shape in expected.items():
        found = stored[name]
        if found.dtype is not None and not is_floating(found.dtype):
            raise CheckpointInputError(
                found.file, f"tensor {name} has dtype {_dtype_name(found.dtype)}, expected floating point weights"
            )
        fits = found.shape == shape or (
            name in padded_rows and len(found.shape) == len(shape) and found.shape[0] >= shape[0]
            and found.shape[1:] == shape[1:]
        )  # fmt: skip
        if not fits:
            at_least = " (or more rows: a padded vocabulary)" if name in padded_rows else ""
            raise CheckpointInputError(
                found.file, f"tensor {name} has shape {found.shape}, the architecture needs {shape}{at_least}"
            )


def check_part_tensors(
    arch: ModelArchitecture, stored: Mapping[str, StoredTensor], name_of: Callable[[str, int | None], str],
    layer_index: re.Pattern, layer_key: str, where: Path, hints: Mapping[str, str] | None = None,
) -> None:
    """The stored tensors of a format that names each part (`name_of(part, layer)`: Hugging
    Face, GGUF) are what `arch` needs: its layers (`layer_index` matches a name's layer index;
    `layer_key` is the setting that gave num_layers), every part present, floating point, of
    its shape. `hints`: what a missing name's message adds (a setting that asks for it)."""
    layers = (int(m.group(1)) for name in stored if (m := layer_index.match(name)))
    check_layer_count(arch.num_layers, layers, layer_key, where)
    needed = {name_of(part, layer): part for part, layer in source_parts(arch)}
    missing = [name for name in needed if name not in stored]
    if missing:
        hint = "".join((hints or {}).get(name, "") for name in missing)
        raise CheckpointInputError(where, f"no tensor {_few(missing)}{hint}")
    shapes = part_shapes(arch)
    check_stored_tensors({name: shapes[part] for name, part in needed.items()}, stored)


def check_finite(name: str, tensor: torch.Tensor, where: str | Path, check_all: bool, what: str = "") -> None:
    """No NaN or infinity in `tensor`: in an evenly spaced sample of FINITE_SAMPLE elements, or in
    all of them with `check_all`. `what` says which form of the tensor was checked."""
    flat = tensor.reshape(-1)
    if not check_all and flat.numel() > FINITE_SAMPLE:
        flat = flat[:: flat.numel() // FINITE_SAMPLE]
    if not bool(torch.isfinite(flat).all()):
        raise CheckpointInputError(where, f"tensor {name} holds NaN or infinite values{what}")


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _few(names: Iterable[str], limit: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def _json_kind(data: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(data), "number")
