"""Writes a canonical Lamina checkpoint directory from a stream of canonical tensors.

Called by `convert.convert_checkpoint` (and so by `tools/convert_checkpoint.py`) with a
source reader's architecture, tensor iterator and tokenizer saver. Peak memory is about one
tensor: the safetensors header is computed up front from the architecture (every canonical
shape is known from it), then each tensor is written at its offset as it arrives, once its
values are checked finite (`validate.check_finite`). Everything goes into a temporary
directory next to the output that is renamed into place at the end, so an existing
checkpoint is never left half-overwritten, and a failure (bad input, full or read-only disk:
one `CheckpointInputError`) leaves nothing behind. `--overwrite` replaces only a checkpoint:
a directory holding anything else, or an input of this conversion, is refused.
With `weight_dtype` fp8_e4m3 the layers' linear weights (layout.FP8_LINEAR_WEIGHTS) are
quantized as they stream, from the source's own values, per output channel (fp8.quantize_weight),
and written as e4m3 beside their float32 scales; config.json records `"weight_dtype"`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_lamina.architecture import FORMAT, ModelArchitecture, read_checkpoint_config
from megatron_lamina.checkpoint.errors import CheckpointInputError
from megatron_lamina.checkpoint.layout import canonical_tensor_shapes, is_fp8_linear, scale_name
from megatron_lamina.checkpoint.validate import check_finite
from megatron_lamina.fp8 import FP8, FP8_NAME, quantize_weight

MODEL_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", FP8: "F8_E4M3"}
WEIGHT_DTYPES = ("auto", FP8_NAME)  # auto: every tensor in `dtype`
CHECKPOINT_ENTRIES = {"config.json", MODEL_FILE, TOKENIZER_DIR}


def check_output_dir(output_dir: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Fail early (before any reading) when the output exists and may not be replaced: an
    existing directory may be empty, or, with `overwrite`, a checkpoint that holds none of
    `inputs` (the paths this conversion reads)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointInputError(output_dir, "is a file; --output names the directory to write the checkpoint in")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    resolved = output_dir.resolve()
    inside = [Path(p) for p in inputs if p is not None and resolved in (Path(p).resolve(), *Path(p).resolve().parents)]
    if inside:
        raise CheckpointInputError(output_dir, f"holds {inside[0]}, an input of this conversion; choose another --output")
    others = sorted(entry.name for entry in output_dir.iterdir() if entry.name not in CHECKPOINT_ENTRIES)
    if others or not _is_checkpoint(output_dir):
        what = f"holds {', '.join(others[:4])}{' ...' if len(others) > 4 else ''}" if others else "has no valid config.json"
        raise CheckpointInputError(
            output_dir, f"is not a megatron-lamina checkpoint ({what}); --overwrite replaces only a checkpoint, "
            "so choose another --output"
        )
    if not overwrite:
        raise CheckpointInputError(output_dir, "already exists; pass --overwrite to replace it")


def _is_checkpoint(directory: Path) -> bool:
    try:
        read_checkpoint_config(directory)
    except (OSError, ValueError, AttributeError):  # AttributeError: a config.json that is no JSON object
        return False
    return True


@contextmanager
def _writing(output_dir: Path) -> Iterator[None]:
    """A disk or permission error while writing: one CheckpointInputError naming the output."""
    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise CheckpointInputError(output_dir, f"cannot write the checkpoint: {e.strerror or e}{where}") from None


def write_canonical_checkpoint(
    output_dir: str | Path,
    arch: ModelArchitecture,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: str,
    save_tokenizer: Callable[[Path], None],
    source: dict[str, Any],
    overwrite: bool = False,
    check_all_weights: bool = False,
    inputs: Iterable[str | Path | None] = (),
    weight_dtype: str = "auto",
) -> Path:
    """Write `config.json`, `tokenizer/` (via `save_tokenizer(dir)`) and `model.safetensors`.

    `tensors` must yield exactly the names of `canonical_tensor_shapes(arch)`, in any order.
    Each is checked finite in a sample of its values, or in all with `check_all_weights`.
    `inputs` are the paths the tensors come from (see `check_output_dir`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    output_dir = Path(output_dir).absolute()
    check_output_dir(output_dir, overwrite, inputs)
    tmp_dir = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    with _writing(output_dir):
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
    try:
        _write_safetensors(tmp_dir / MODEL_FILE, arch, tensors, DTYPES[dtype], source.get("path", "<source>"),
                           check_all_weights, output_dir, fp8_weights=weight_dtype == FP8_NAME)
        with _writing(output_dir):
            save_tokenizer(tmp_dir / TOKENIZER_DIR)
            config = {
                "format": FORMAT,
                "architecture": arch.to_dict(),
                "dtype": dtype,
                **({"weight_dtype": weight_dtype} if weight_dtype != "auto" else {}),
                "tokenizer": TOKENIZER_DIR,
                "source": source,
            }
            (tmp_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            _replace_dir(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return output_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an old `target` is moved away first (and back if the rename
    fails) and deleted last."""
    if not target.exists():
        new.rename(target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old)


def _write_safetensors(
    path: Path,
    arch: ModelArchitecture,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    source_path: str,
    check_all_weights: bool,
    output_dir: Path,
    fp8_weights: bool = False,
) -> None:
    # safetensors layout: u64 little-endian header length, JSON header (tensor -> dtype,
    # shape, [begin, end) byte offsets into the data block that follows), raw tensor bytes.
    shapes = canonical_tensor_shapes(arch)
    stored = {}  # name -> (dtype, shape): the canonical tensors, and FP8 weights' scales beside them
    for name, shape in shapes.items():
        if fp8_weights and is_fp8_linear(name):
            stored[name] = (FP8, shape)
            stored[scale_name(name)] = (torch.float32, shape[:1])
        else:
            stored[name] = (dtype, shape)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (stored_dtype, shape) in stored.items():
        nbytes = stored_dtype.itemsize * _numel(shape)
        header[name] = {
            "dtype": _SAFETENSORS_DTYPE[stored_dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data block starts 8-byte aligned
    data_start = 8 + len(header_bytes)

    written: set[str] = set()
    with _writing(output_dir):
        f = open(path, "wb")
    with f:
        with _writing(output_dir):
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            f.truncate(data_start + offset)
        for name, tensor in tqdm(tensors, total=len(shapes), desc="writing model.safetensors", unit="tensor",
                                 disable=None):
            if name not in shapes:
                raise CheckpointInputError(source_path, f"unexpected tensor {name} (not in the canonical layout)")
            if tuple(tensor.shape) != shapes[name]:
                raise CheckpointInputError(
                    source_path,
                    f"tensor {name} has shape {tuple(tensor.shape)}, the architecture needs {shapes[name]}",
                )
            assert name not in written, f"reader yielded {name} twice"
            if stored[name][0] == FP8:  # e4m3 saturates; its scales are checked finite
                check_finite(name, tensor, source_path, check_all_weights)
                values, scales = quantize_weight(tensor.detach().to("cpu"))
                parts = [(name, values), (scale_name(name), scales)]
            else:
                values = tensor.detach().to("cpu", dtype)
                _check_values(name, tensor, values.reshape(-1), source_path, check_all_weights)
                parts = [(name, values)]
            for part, values in parts:
                with _writing(output_dir):
                    f.seek(data_start + header[part]["data_offsets"][0])
                    f.write(memoryview(values.contiguous().reshape(-1).view(torch.uint8).numpy()))
            written.add(name)
    missing = [name for name in shapes if name not in written]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise CheckpointInputError(source_path, f"no tensor for {', '.join(missing[:5])}{more}")


def _check_values(name: str, source: torch.Tensor, written: torch.Tensor, source_path: str, check_all: bool) -> None:
    """The values as written are finite; if not, the source's say whether the source holds
    NaN/inf or the cast to the output dtype overflowed."""
    try:
        check_finite(name, written, source_path, check_all)
    except CheckpointInputError:
        check_finite(name, source, source_path, check_all)
        raise CheckpointInputError(
            source_path, f"tensor {name} has values beyond {str(written.dtype).removeprefix('torch.')}'s range; "
            "convert with --dtype bfloat16 or float32"
        ) from None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
