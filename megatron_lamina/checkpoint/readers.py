"""The registry of checkpoint source formats, and the interface every source reader offers.

`tools/convert_checkpoint.py` offers `--source` choices from `READERS` and opens the input
with `open_reader`; adding a source means writing one reader module and adding one line
here. Reader modules are imported only when used, so `--source hf` does not need the `gguf`
package. Options beyond the input path (`tokenizer`, `model_config`) go to the readers whose
constructors take them; giving one to a reader that does not is an error.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from megatron_lamina.architecture import ModelArchitecture

if TYPE_CHECKING:
    import torch


class CheckpointReader(Protocol):
    """Opened source checkpoint. The constructor validates the input (raising
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
    return reader_class(Path(input_path), **options)
