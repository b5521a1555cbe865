"""The canonical writer: streamed safetensors in any tensor order, and its own checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_lamina.architecture import FORMAT, ModelArchitecture, read_architecture
from megatron_lamina.checkpoint.layout import canonical_tensor_shapes
from megatron_lamina.checkpoint.writer import write_canonical_checkpoint

ARCH = ModelArchitecture(
    vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=2, num_attention_heads=4,
    num_kv_heads=2, head_dim=2, max_position_embeddings=32, qkv_bias=True, eos_token_ids=[1],
)  # fmt: skip


def _random_tensors(arch: ModelArchitecture) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {name: torch.randn(shape) for name, shape in canonical_tensor_shapes(arch).items()}


def _write(out, tensors, dtype="float32", **kwargs):
    def save_tokenizer(directory):
        directory.mkdir()
        (directory / "tokenizer.json").write_text("{}")

    return write_canonical_checkpoint(
        out, ARCH, tensors, dtype=dtype, save_tokenizer=save_tokenizer, source={"path": "src"}, **kwargs
    )


def test_any_order_and_dtype(tmp_path):
    tensors = _random_tensors(ARCH)
    out = _write(tmp_path / "out", reversed(list(tensors.items())), dtype="float16")
    loaded = load_file(out / "model.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == torch.float16
        assert torch.equal(loaded[name], tensor.half()), name
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == FORMAT and config["dtype"] == "float16" and config["source"] == {"path": "src"}
    assert read_architecture(out) == ARCH
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_missing_and_misshapen_tensors(tmp_path):
    tensors = _random_tensors(ARCH)
    del tensors["decoder.final_layernorm.weight"]
    with pytest.raises(ValueError, match="src: no tensor for decoder.final_layernorm.weight"):
        _write(tmp_path / "out", tensors.items())
    tensors = _random_tensors(ARCH)
    tensors["output_layer.weight"] = torch.zeros(11, 8)
    needs = r"tensor output_layer.weight has shape \(11, 8\), the architecture needs \(10, 8\)"
    with pytest.raises(ValueError, match=needs):
        _write(tmp_path / "out", tensors.items())
    tensors = _random_tensors(ARCH)
    tensors["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected tensor decoder.extra.weight"):
        _write(tmp_path / "out", tensors.items())
    assert list(tmp_path.iterdir()) == []  # nothing left behind
