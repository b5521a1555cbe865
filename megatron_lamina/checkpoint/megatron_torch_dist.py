"""Reads the tensors of a Megatron-core distributed checkpoint (`torch_dist`), a layer at a time.

Such a directory (what `megatron.core.dist_checkpointing.save` and Megatron-LM's
`--ckpt-format torch_dist` write) holds `metadata.json` (the backend), `common.pt` (non-tensor
state, Megatron-LM's `args` among it) and torch.distributed.checkpoint (DCP) files: `.metadata`
and one `__R_S.distcp` per writer. Megatron's `dist_checkpointing` API gives us the backend,
the common state and every tensor's global shape. Tensors are stored *global*: the TP shards
of a weight are pieces of one tensor whose rows are already in canonical order (fused QKV
groups in order; fc1 all gate rows then all up rows, which Megatron's SwiGLU sharded factory
arranges), and layers are stacked along a leading axis (`decoder.layers.<name>`, shape
[num_layers, ...]) or, when saved as non-homogeneous layers, kept apart
(`decoder.layers.N.<name>`; fc1 then possibly split into `..._w` and `..._v`).

Before any tensor is read, every model tensor's stored pieces are checked against the files
(`_check_storage`): each `.distcp` file present and long enough, each piece's bytes enough for
its values, the pieces covering the tensor's global shape; so a missing or truncated shard,
or a shape no file holds, is one error naming the file.

One layer is read out of a stacked tensor with a DCP load plan for just that region
(`_RegionLoadPlanner`): only that layer's bytes are read, and no process group is needed.
(`dist_checkpointing.load` would need one as large as the saving grid to load a part of a
tensor: it describes the other parts as belonging to other ranks.) Used by `megatron_reader`.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_lamina.checkpoint.errors import CheckpointInputError
from megatron_lamina.checkpoint.megatron_names import canonical_name, is_model_tensor
from megatron_lamina.checkpoint.validate import StoredTensor

SUPPORTED_BACKEND = "torch_dist"


class TorchDistTensors:
    """Canonical-name access to the model tensors of one torch_dist checkpoint directory."""

    def __init__(self, checkpoint_dir: Path):
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.core import maybe_load_config

        self.path = checkpoint_dir
        config = maybe_load_config(str(checkpoint_dir))
        if config is None:
            raise CheckpointInputError(checkpoint_dir, "not a Megatron distributed checkpoint (no metadata.json)")
        if config.sharded_backend != SUPPORTED_BACKEND:
            raise CheckpointInputError(
                checkpoint_dir / "metadata.json",
                f"sharded backend {config.sharded_backend!r} is not supported (only {SUPPORTED_BACKEND}); "
                "re-save the checkpoint with --ckpt-format torch_dist",
            )
        self.common = _load_common(checkpoint_dir)
        try:
            metadata = dist_checkpointing.load_tensors_metadata(str(checkpoint_dir))
        except Exception as e:  # DCP raises many kinds on a missing or damaged .metadata
            raise CheckpointInputError(checkpoint_dir, f"cannot read the tensor metadata ({e})") from None
        self._storage = _CachedMetadataReader(str(checkpoint_dir))
        try:
            stored = self._storage.read_metadata()
        except Exception as e:  # a missing or damaged .metadata
            raise CheckpointInputError(checkpoint_dir / ".metadata", f"cannot read the tensor metadata ({e})") from None
        # canonical name -> [(stored key, layer index in a stacked tensor or None, global shape, dtype)]
        self._sources: dict[str, list[tuple[str, int | None, tuple[int, ...], torch.dtype]]] = {}
        for key in sorted(metadata):
            if is_model_tensor(key):
                self._check_storage(key, stored)
                self._add(key, metadata[key])

    def _check_storage(self, key: str, stored: Any) -> None:
        """The pieces of tensor `key` that DCP's metadata lists are all in files that hold them
        whole, and together cover its global shape."""
        meta = stored.state_dict_metadata.get(key)
        if meta is None or not hasattr(meta, "chunks"):
            raise CheckpointInputError(self.path / ".metadata", f"lists no stored pieces of tensor {key}")
        itemsize = torch.empty((), dtype=meta.properties.dtype).element_size()
        covered = 0
        for chunk in meta.chunks:
            info = stored.storage_data.get(MetadataIndex(key, chunk.offsets))
            if info is None:
                raise CheckpointInputError(self.path / ".metadata", f"names no file for a piece of tensor {key}")
            file, end = self.path / info.relative_path, info.offset + info.length
            if not file.is_file():
                raise CheckpointInputError(file, f"missing (a shard holding tensor {key})")
            if file.stat().st_size < end:
                raise CheckpointInputError(
                    file, f"truncated: {file.stat().st_size} bytes, tensor {key} is stored up to byte {end}"
                )
            numel = math.prod(chunk.sizes)
            if numel * itemsize > info.length:
                raise CheckpointInputError(
                    file, f"tensor {key}: a piece of shape {tuple(chunk.sizes)} needs {numel * itemsize} bytes, "
                    f"the file stores {info.length}"
                )
            covered += numel
        if covered != math.prod(meta.size):
            raise CheckpointInputError(
                self.path / ".metadata",
                f"tensor {key} has shape {tuple(meta.size)}, but its stored pieces hold {covered} values",
            )

    def _add(self, key: str, meta: Any) -> None:
        # Non-homogeneous saves may split fc1 into its gate (_w) and up (_v) halves.
        base = key[:-2] if key.endswith(("weight_w", "weight_v")) else key
        try:
            name = canonical_name(base)
        except KeyError:
            raise CheckpointInputError(self.path, f"tensor {key} is not supported (not a LLaMA-style layer)") from None
        shape = tuple(meta.global_shape)
        if "{layer}" in name and not shape:
            raise CheckpointInputError(self.path, f"tensor {key} is a scalar, expected layers stacked on its first axis")
        layers = [None] if "{layer}" not in name else range(shape[0])
        for layer in layers:
            canonical = name if layer is None else name.format(layer=layer)
            self._sources.setdefault(canonical, []).append((key, layer, shape, meta.dtype))
            if len(self._sources[canonical]) > 1 and base == key:
                stored = ", ".join(source[0] for source in self._sources[canonical])
                raise CheckpointInputError(self.path, f"tensors {stored} are both {canonical}")

    def names(self) -> set[str]:
        return set(self._sources)

    def stored(self, name: str) -> StoredTensor:
        """The shape and dtype `tensor(name)` will have, from the metadata."""
        sources = self._sources[name]
        shapes = [shape if layer is None else shape[1:] for _, layer, shape, _ in sources]
        if len(shapes) == 1:
            return StoredTensor(shapes[0], sources[0][3], self.path)
        if not all(shapes) or len({shape[1:] for shape in shapes}) > 1:
            keys = ", ".join(source[0] for source in sources)
            raise CheckpointInputError(self.path, f"tensors {keys} (the halves of {name}) do not fit: {shapes}")
        return StoredTensor((sum(shape[0] for shape in shapes), *shapes[0][1:]), sources[0][3], self.path)

    def tensor(self, name: str) -> torch.Tensor:
        """The whole (TP-merged) tensor `name`; fc1 halves are read and concatenated."""
        # A split fc1 is ..._w (gate rows) then ..._v (up rows).
        sources = sorted(self._sources[name], key=lambda source: source[0].endswith("_v"))
        parts = [self._read(*source) for source in sources]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _read(self, key: str, layer: int | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        offsets = (0,) * len(shape) if layer is None else (layer,) + (0,) * (len(shape) - 1)
        region = torch.empty(shape if layer is None else (1, *shape[1:]), dtype=dtype)
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore")
                load(
                    {key: region},
                    storage_reader=self._storage,
                    planner=_RegionLoadPlanner({key: offsets}),
                    no_dist=True,
                )
        except Exception as e:  # a missing or truncated .distcp file, ...
            raise CheckpointInputError(self.path, f"cannot read tensor {key} ({e})") from None
        return region if layer is None else region[0]


class _CachedMetadataReader(FileSystemReader):
    """Reads `.metadata` (which lists every chunk, optimizer state included: it can be large)
    once for all the loads of one conversion."""

    def __init__(self, path: str):
        super().__init__(path)
        self._metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Loads a region of each stored tensor into a plain tensor of the region's size:
    `regions` maps a key to the region's offsets; the tensor in the state dict gives its size."""

    def __init__(self, regions: dict[str, tuple[int, ...]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        reads = []
        for key, offsets in self.regions.items():
            region = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=self.state_dict[key].shape)
            reads += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [region])
        return LoadPlan(reads)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        # The read items address the region by its global offset; our tensor *is* the region
        # (the items' dest_offsets are relative to it).
        return self.state_dict[index.fqn]


def _load_common(checkpoint_dir: Path) -> dict[str, Any]:
    """common.pt, allowing the classes Megatron-LM pickles into it (its argparse Namespace and
    Megatron's enums)."""
    from megatron.core import dist_checkpointing
    from megatron.core.transformer import enums

    allowed = [argparse.Namespace] + [
        c for _, c in inspect.getmembers(enums, inspect.isclass) if issubclass(c, enum.Enum)
    ]
    try:
        with torch.serialization.safe_globals(allowed):
            return dist_checkpointing.load_common_state_dict(str(checkpoint_dir))
    except Exception as e:  # an unpickling error names the class it refused
        raise CheckpointInputError(
            checkpoint_dir / "common.pt",
            f"cannot read the training arguments ({e}); pass --model-config instead",
        ) from None
