"""The registry of checkpoint source formats, and the interface every source reader offers.

`tools/convert_checkpoint.py` offers `--source` choices from `READERS` and opens the input
with `open_reader`; adding a source means writing one reader module and adding one line
here. Reader modules are imported only when used, so `--source hf` does not need the `gguf`
package. Options beyond the input path (`tokenizer`, `model_config`) go to the readers whose
constructors take them; giving one to a reader that does not is an error. When a reader
refuses an input that looks like another source's (`guess_source`), the error says which
`--source` it looks like.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from megatron_lamina.architecture import ModelArchitecture
from megatron_lamina.checkpoint.errors import CheckpointInputError

if TYPE_CHECKING:
    import torch


class CheckpointReader(Protocol):
    """Opened source checkpoint. The constructor validates the input with `validate`'s rules
    (architecture, layer count, each tensor's dtype and shape, shards; raising
    `CheckpointInputError`) without reading tensor data."""

    path: Path
    architecture: ModelArchitecture
    default_dtype: str  # what `--dtype auto` means for this source

    def tensors(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Canonical (name, tensor) pairs, read lazily one at a time."""
        ...

    def save_tokenizer(self, output_dir: Path) -> None:
        """Save a Hugging Face tokenizer (with its chat template) into `output_dir`."""
        ...

    def provenance(self) -> dict[str, Any]:
        """Free-form description of the source for config.json's "source"; has "path"."""
        ...


# source name -> (module, class); the class is constructed with the input path.
READERS: dict[str, tuple[str, str]] = {
    "hf": ("megatron_lamina.checkpoint.hf_reader", "HFCheckpointReader"),
    "gguf": ("megatron_lamina.checkpoint.gguf_reader", "GGUFCheckpointReader"),
    "megatron": ("megatron_lamina.checkpoint.megatron_reader", "MegatronCheckpointReader"),
    "deepspeed": ("megatron_lamina.checkpoint.deepspeed_reader", "DeepSpeedCheckpointReader"),
}


def open_reader(source: str, input_path: str | Path, **options: Path | None) -> CheckpointReader:
    """`options` (tokenizer=..., model_config=...) that are None are left out."""
    if source not in READERS:
        raise ValueError(f"unknown checkpoint source {source!r}; known: {', '.join(READERS)}")
    module_name, class_name = READERS[source]
    reader_class = getattr(importlib.import_module(module_name), class_name)
    options = {name: Path(value) for name, value in options.items() if value is not None}
    accepted = inspect.signature(reader_class).parameters
    for name in options:
        if name not in accepted:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to --source {source}")
    try:
        return reader_class(Path(input_path), **options)
    except CheckpointInputError as e:
        hint = _source_hint(source, Path(input_path))
        if hint is None:
            raise
        raise CheckpointInputError(e.path, f"{e.reason}; {hint}") from None


def _source_hint(source: str, path: Path) -> str | None:
    """What to pass instead, when `path` (or the directory of a file) looks like some source's input."""
    guess = guess_source(path)
    if guess is not None:
        return None if guess == source else f"{path} looks like a --source {guess} input"
    if path.is_file() and (parent := guess_source(path.parent)) is not None:
        return f"its directory {path.parent} looks like a --source {parent} input"
    return None


def guess_source(path: Path) -> str | None:
    """The source format `path` looks like, from its file names alone (or a GGUF file's magic)."""
    if path.is_file():
        with open(path, "rb") as f:
            return "gguf" if f.read(4) == b"GGUF" else None
    if not path.is_dir():
        return None
    names = {p.name for p in path.iterdir()}
    if "latest" in names or any(n.startswith("global_step") or n.endswith("_optim_states.pt") for n in names):
        return "deepspeed"
    if names & {"latest_checkpointed_iteration.txt", "metadata.json"} or any(
            n.startswith(("iter_", "mp_rank_")) for n in names):
        return "megatron"
    if "config.json" in names and any(n.endswith((".safetensors", ".bin", ".index.json")) for n in names):
        return "hf"
    return None
