"""Checkpoints: readers for each source format, the canonical writer, the TP-slicing loader.

`tools/convert_checkpoint.py` (or `convert.convert_checkpoint`) turns a source checkpoint
(Hugging Face, GGUF, ...; see `readers.READERS`) into one canonical Lamina checkpoint (layout
in `megatron_lamina.architecture`); model workers read their tensor-parallel shard of it with
`loader.CheckpointShardLoader`. Import the submodules directly: this package imports nothing,
so `--help` and `--source hf` never load a reader's dependencies.
"""
