"""Reads a legacy Megatron checkpoint (`iter_N/mp_rank_TT[_PPP]/model_optim_rng.pt`), merging its shards.

Megatron-LM's `--ckpt-format torch` writes one torch.save'd dict per model-parallel rank:
`mp_rank_TT` for tensor rank TT without pipeline parallelism, `mp_rank_TT_PPP` with it. Each
holds "args", "iteration", "checkpoint_version" and that rank's "model" state dict ("model0",
"model1", ... with virtual pipeline stages; pre-core Megatron-LM nests it as
{"language_model": {"embedding": ..., "encoder": ...}}, which we flatten with dots).

Each TP rank holds its shard as Megatron's parallel layers do, so merging is:
    word embeddings, output layer   rows (the padded vocabulary)
    linear_qkv weight and bias      rows (each rank holds whole KV groups, in order)
    linear_fc1                      rows, but each rank holds [its gate rows; its up rows]:
                                    all ranks' gate halves, then all their up halves
    linear_proj, linear_fc2         columns
    norms                           replicated (rank 0's copy)
Pipeline stages number their layers from 0; a piece's layers follow those of the pieces
before it, in Megatron's order (virtual chunk 0 of every stage in stage order, then chunk 1,
...), so a global index is the local one plus the layer count of the earlier pieces.

Files are memory-mapped (`torch.load(mmap=True)`), so merging a tensor reads only its TP
shards. They are pickles that need `weights_only=False` (argparse Namespace, RNG and
optimizer state), loaded as Megatron-LM loads them: convert only checkpoints you trust.
Used by `megatron_reader`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from megatron_lamina.checkpoint.errors import CheckpointInputError
from megatron_lamina.checkpoint.layout import EMBEDDING, OUTPUT_LAYER
from megatron_lamina.checkpoint.megatron_names import IGNORED_SUFFIXES, canonical_name, split_layer
from megatron_lamina.checkpoint.validate import StoredTensor

MODEL_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")  # split along columns
_COLUMN_PARALLEL = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")  # along rows


def is_legacy_checkpoint(directory: Path) -> bool:
    return any(_RANK_DIR.fullmatch(d.name) for d in directory.iterdir() if d.is_dir())


class LegacyShards:
    """Canonical-name access to the merged model tensors of one `iter_N` directory."""

    def __init__(self, iteration_dir: Path):
        self.path = iteration_dir
        grid = self._rank_files(iteration_dir)
        self.tp_size = 1 + max(t for t, _ in grid)
        self.pp_size = 1 + max(p for _, p in grid)
        self._states = {rank: _load(path) for rank, path in grid.items()}
        first = self._states[(0, 0)]
        self.first_file = grid[(0, 0)]
        self.args = first.get("args")
        self.iteration = first.get("iteration")
        self._check_against_args(grid)
        version = first.get("checkpoint_version")
        if version is not None and version < 2.0:
            raise CheckpointInputError(
                self.first_file, f"checkpoint_version {version} (QKV layout before Megatron-LM 2.0) is not supported"
            )
        # canonical name -> (pipeline stage, model key ("model", "model0", ...), stored name)
        self._sources: dict[str, tuple[int, str, str]] = {}
        self._index_layers()

    @staticmethod
    def _rank_files(iteration_dir: Path) -> dict[tuple[int, int], Path]:
        grid: dict[tuple[int, int], Path] = {}
        with_pipeline = set()
        for d in sorted(iteration_dir.iterdir()):
            match = _RANK_DIR.fullmatch(d.name)
            if match and d.is_dir():
                with_pipeline.add(match.group(2) is not None)
                grid[(int(match.group(1)), int(match.group(2) or 0))] = d / MODEL_FILE
        if len(with_pipeline) > 1:
            raise CheckpointInputError(iteration_dir, "mixes mp_rank_TT and mp_rank_TT_PPP directories")
        tp, pp = 1 + max(t for t, _ in grid), 1 + max(p for _, p in grid)
        for t in range(tp):
            for p in range(pp):
                if (t, p) not in grid:
                    name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if with_pipeline == {True} else "")
                    raise CheckpointInputError(
                        iteration_dir / name,
                        f"missing: tensor-parallel ranks 0-{tp - 1} x pipeline stages 0-{pp - 1} need every pair",
                    )
                if not grid[(t, p)].is_file():
                    raise CheckpointInputError(grid[(t, p)], "missing")
        return grid

    def _check_against_args(self, grid: dict[tuple[int, int], Path]) -> None:
        args = vars(self.args) if self.args is not None and not isinstance(self.args, dict) else self.args or {}
        for what, found, arg in (
            ("tensor", self.tp_size, "tensor_model_parallel_size"),
            ("pipeline", self.pp_size, "pipeline_model_parallel_size"),
        ):
            expected = args.get(arg)
            if expected is not None and expected != found:
                raise CheckpointInputError(
                    self.path, f"has {found} {what}-parallel shard(s), but the training arguments say {arg}={expected}"
                )

    def _index_layers(self) -> None:
        model_keys = sorted(
            (k for k in self._states[(0, 0)] if re.fullmatch(r"model\d*", k)), key=lambda k: int(k[5:] or 0)
        )
        if not model_keys:
            raise CheckpointInputError(self.first_file, "holds no model state dict ('model' key)")
        offset = 0
        for model_key in model_keys:  # virtual pipeline chunk
            for stage in range(self.pp_size):
                for t in range(self.tp_size):
                    state = self._states[(t, stage)].get(model_key)
                    if not isinstance(state, dict):
                        raise CheckpointInputError(self._file(stage, t), f"holds no {model_key!r} state dict")
                    self._states[(t, stage)][model_key] = _flatten(state)
                flat = self._states[(0, stage)][model_key]
                layers = 0
                for stored in flat:
                    try:
                        name = canonical_name(stored)
                    except KeyError:
                        raise CheckpointInputError(
                            self._file(stage), f"tensor {stored} is not supported (not a LLaMA-style layer)"
                        ) from None
                    layer, rest = split_layer(name)
                    if layer is not None:
                        layers = max(layers, layer + 1)
                        name = f"decoder.layers.{offset + layer}.{rest}"
                    # A tied output layer on the last stage repeats the embedding: keep the first.
                    self._sources.setdefault(name, (stage, model_key, stored))
                offset += layers

    def _file(self, stage: int, tp_rank: int = 0) -> Path:
        name = f"mp_rank_{tp_rank:02d}" + (f"_{stage:03d}" if self.pp_size > 1 else "")
        return self.path / name / MODEL_FILE

    def names(self) -> set[str]:
        return set(self._sources)

    def tensor(self, name: str) -> torch.Tensor:
        return _merge_tensor_parallel(name, self._shards(name))

    def stored(self, name: str) -> StoredTensor:
        """The shape and dtype `tensor(name)` will have: its shards merged on the meta device
        (shapes only, no data read)."""
        stage, _, stored = self._sources[name]
        shards = [torch.empty(s.shape, dtype=s.dtype, device="meta") for s in self._shards(name)]
        try:
            merged = _merge_tensor_parallel(name, shards)
        except RuntimeError as e:  # torch.cat of shards whose other dimensions differ
            raise CheckpointInputError(
                self._file(stage), f"the tensor-parallel shards of {stored} do not fit together ({e})"
            ) from None
        return StoredTensor(tuple(merged.shape), merged.dtype, self._file(stage))

    def _shards(self, name: str) -> list[torch.Tensor]:
        stage, model_key, stored = self._sources[name]
        shards = []
        for t in range(self.tp_size):
            shard = self._states[(t, stage)][model_key].get(stored)
            if shard is None:
                raise CheckpointInputError(self._file(stage, t), f"lacks tensor {stored} (present on TP rank 0)")
            shards.append(shard)
        return shards


def _merge_tensor_parallel(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    if len(shards) == 1:
        return shards[0]
    if name in (EMBEDDING, OUTPUT_LAYER) or name.endswith(_COLUMN_PARALLEL):
        return torch.cat(shards)
    if name.endswith("mlp.linear_fc1.weight"):
        gates, ups = zip(*(shard.chunk(2) for shard in shards))
        return torch.cat(gates + ups)
    if name.endswith(_ROW_PARALLEL):
        return torch.cat(shards, dim=1)
    return shards[0]  # norms: replicated


def _flatten(state: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """{"language_model": {"encoder": {"layers.0.x": t}}} -> {"language_model.encoder.layers.0.x": t};
    drops non-tensors (Transformer Engine's _extra_state) and buffers."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, torch.Tensor) and not name.endswith(IGNORED_SUFFIXES):
            flat[name] = value
    return flat


def _load(path: Path) -> dict[str, Any]:
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError:  # the legacy (non-zip) torch.save format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointInputError(path, f"cannot read as a Megatron checkpoint file ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointInputError(path, f"holds a {type(state).__name__}, not a Megatron checkpoint dict")
    return state
