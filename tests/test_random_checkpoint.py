"""checkpoint/random_weights.py and its CLI, tools/random_checkpoint.py: a canonical checkpoint
of a preset's shape that the loader and the tokenizer code read, the same values whatever the
thread count and the row blocks the values are drawn in."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from megatron_lamina.architecture import read_architecture
from megatron_lamina.checkpoint.layout import canonical_tensor_shapes
from megatron_lamina.checkpoint.loader import CheckpointShardLoader
from megatron_lamina.checkpoint.random_weights import write_random_checkpoint
from megatron_lamina.planner.shapes import PRESETS, load_shape

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_checkpoint_has_the_shape_and_loads(tmp_path):
    # several row blocks per matrix, drawn by one thread and by two
    one = write_random_checkpoint(tmp_path / "one", "tiny", "float32", threads=1, block_elements=64 * 16)
    write_random_checkpoint(tmp_path / "two", "tiny", "float32", threads=2, block_elements=64 * 16)
    assert load_tool("random_checkpoint").main(["--shape", "tiny", "--dtype", "float32", "--output",
                                                str(tmp_path / "cli")]) == 0
    assert read_architecture(tmp_path / "cli") == read_architecture(one)
    arch = read_architecture(one)
    assert load_shape(str(one)).to_dict() == {**PRESETS["tiny"].to_dict(), "name": "one"}
    assert (arch.bos_token_id, arch.eos_token_ids) == (1, [2])
    tensors, again = load_file(one / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == canonical_tensor_shapes(arch)
    for name, t in tensors.items():
        assert torch.equal(t, again[name]), name  # the thread count does not change the values
        if t.dim() == 1:
            assert torch.all(t == 1), name
        else:
            assert 0.015 < float(t.std()) < 0.025 and abs(float(t.mean())) < 0.005, name
    qkv = [t for name, t in tensors.items() if name.endswith("linear_qkv.weight")]
    assert not torch.equal(qkv[0], qkv[1])  # every tensor has its own seed
    CheckpointShardLoader(one, 0, 2)  # TP 2 divides the heads: the loader accepts it
    tok = AutoTokenizer.from_pretrained(str(one / "tokenizer"))
    assert len(tok) == arch.vocab_size  # every id the model can emit decodes to a word
    assert tok.decode([3, 4, arch.vocab_size - 1]) == f"w0 w1 w{arch.vocab_size - 4}"
    assert tok("w0 w1")["input_ids"] == [1, 3, 4]
