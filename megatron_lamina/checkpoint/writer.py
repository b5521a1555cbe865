"""Writes a canonical Lamina checkpoint directory from a stream of canonical tensors.

Called by `convert.convert_checkpoint` (and so by `tools/convert_checkpoint.py`) with a
source reader's architecture, tensor iterator and tokenizer saver. Peak memory is about one
tensor: the safetensors header is computed up front from the architecture (every canonical
shape is known from it), then each tensor is written at its offset as it arrives. Everything
goes into a temporary directory next to the output that is renamed into place at the end, so
an existing checkpoint is never left half-overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_lamina.architecture import FORMAT, ModelArchitecture
from megatron_lamina.checkpoint.errors import CheckpointInputError
from megatron_lamina.checkpoint.layout import canonical_tensor_shapes

MODEL_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Fail early (before any reading) when the output exists and may not be replaced."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointInputError(output_dir, "is a file; --output names the directory to write the checkpoint in")
    if output_dir.exists() and not overwrite:
        raise CheckpointInputError(output_dir, "already exists; pass --overwrite to replace it")


def write_canonical_checkpoint(
    output_dir: str | Path,
    arch: ModelArchitecture,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: str,
    save_tokenizer: Callable[[Path], None],
    source: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write `config.json`, `tokenizer/` (via `save_tokenizer(dir)`) and `model.safetensors`.

    `tensors` must yield exactly the names of `canonical_tensor_shapes(arch)`, in any order.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    output_dir = Path(output_dir).absolute()
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        _write_safetensors(tmp_dir / MODEL_FILE, arch, tensors, DTYPES[dtype], source.get("path", "<source>"))
        save_tokenizer(tmp_dir / TOKENIZER_DIR)
        config = {
            "format": FORMAT,
            "architecture": arch.to_dict(),
            "dtype": dtype,
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
    """Rename `new` to `target`; an old `target` is moved away first and deleted last."""
    if not target.exists():
        new.rename(target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)


def _write_safetensors(
    path: Path,
    arch: ModelArchitecture,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    source_path: str,
) -> None:
    # safetensors layout: u64 little-endian header length, JSON header (tensor -> dtype,
    # shape, [begin, end) byte offsets into the data block that follows), raw tensor bytes.
    shapes = canonical_tensor_shapes(arch)
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = itemsize * _numel(shape)
        header[name] = {
            "dtype": _SAFETENSORS_DTYPE[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data block starts 8-byte aligned
    data_start = 8 + len(header_bytes)

    written: set[str] = set()
    with open(path, "wb") as f:
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
            data = tensor.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8)
            f.seek(data_start + header[name]["data_offsets"][0])
            f.write(memoryview(data.numpy()))
            written.add(name)
    missing = [name for name in shapes if name not in written]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise CheckpointInputError(source_path, f"no tensor for {', '.join(missing[:5])}{more}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
