"""GGUF -> canonical conversion of a tiny llama GGUF written like llama.cpp's converter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoint_fixtures import (
    BOS,
    EOS,
    gguf_roundtrip,
    run_tool,
    hf_config,
    random_hf_model,
    tiny_tokenizer,
    write_tiny_gguf,
)
from safetensors.torch import load_file

from megatron_lamina.architecture import read_architecture
from megatron_lamina.checkpoint.layout import split_qkv

# Mixed tensor types, as real GGUF files have them (norms F32, matrices F16 / quantized).
TYPES = {"attn_q.weight": "F16", "attn_k.weight": "Q8_0", "ffn_up.weight": "Q8_0", "output.weight": "F16"}


@pytest.fixture(scope="module", params=["untied", "tied"])
def converted(request, tmp_path_factory):
    tokenizer = tiny_tokenizer()
    model = random_hf_model(hf_config(tie=request.param == "tied", vocab_size=len(tokenizer)))
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    gguf_path = write_tiny_gguf(root / "tiny.gguf", model, tokenizer, TYPES)
    assert run_tool("--source", "gguf", "--input", gguf_path, "--output", root / "canonical") == 0
    return model, tokenizer, root / "canonical"


def _expected(hf: dict[str, torch.Tensor], hf_name: str, gguf_suffix: str) -> torch.Tensor:
    kind = TYPES.get(gguf_suffix, "F32")
    return torch.from_numpy(gguf_roundtrip(hf[hf_name].float().numpy(), kind))


def test_architecture_from_metadata(converted):
    model, _, out = converted
    c = model.config
    arch = read_architecture(out)
    assert (arch.vocab_size, arch.hidden_size, arch.intermediate_size, arch.num_layers) == (
        c.vocab_size,
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
    )
    assert (arch.num_attention_heads, arch.num_kv_heads, arch.head_dim) == (4, 2, 16)
    assert arch.max_position_embeddings == c.max_position_embeddings
    assert arch.rms_norm_eps == pytest.approx(c.rms_norm_eps)
    assert arch.rope_theta == c.rope_parameters["rope_theta"]
    assert arch.tie_word_embeddings == c.tie_word_embeddings
    assert arch.bos_token_id == BOS and arch.eos_token_ids == [EOS]


def test_weights_match_unpermuted_hf(converted):
    model, _, out = converted
    c = model.config
    arch = read_architecture(out)
    hf = model.state_dict()
    ckpt = load_file(out / "model.safetensors")
    assert ckpt["embedding.word_embeddings.weight"].dtype == torch.float32
    assert torch.equal(ckpt["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(ckpt["decoder.final_layernorm.weight"], hf["model.norm.weight"])
    assert ("output_layer.weight" in ckpt) == (not c.tie_word_embeddings)
    if not c.tie_word_embeddings:
        assert torch.equal(ckpt["output_layer.weight"], _expected(hf, "lm_head.weight", "output.weight"))
    for i in range(c.num_hidden_layers):
        p, h = f"decoder.layers.{i}", f"model.layers.{i}"
        q, k, v = split_qkv(ckpt[f"{p}.self_attention.linear_qkv.weight"], arch)
        assert torch.equal(q, _expected(hf, f"{h}.self_attn.q_proj.weight", "attn_q.weight"))  # F16
        assert torch.equal(k, _expected(hf, f"{h}.self_attn.k_proj.weight", "attn_k.weight"))  # Q8_0
        assert torch.equal(v, hf[f"{h}.self_attn.v_proj.weight"])  # F32: exact
        # Q8_0 stays within its quantization error of the original weights.
        k_hf = hf[f"{h}.self_attn.k_proj.weight"]
        assert (k - k_hf).abs().max() <= k_hf.abs().max() / 127
        gate, up = ckpt[f"{p}.mlp.linear_fc1.weight"].chunk(2)
        assert torch.equal(gate, hf[f"{h}.mlp.gate_proj.weight"])
        assert torch.equal(up, _expected(hf, f"{h}.mlp.up_proj.weight", "ffn_up.weight"))
        assert torch.equal(ckpt[f"{p}.mlp.linear_fc2.weight"], hf[f"{h}.mlp.down_proj.weight"])
        assert torch.equal(ckpt[f"{p}.self_attention.linear_proj.weight"], hf[f"{h}.self_attn.o_proj.weight"])
        assert torch.equal(ckpt[f"{p}.input_layernorm.weight"], hf[f"{h}.input_layernorm.weight"])
        assert torch.equal(ckpt[f"{p}.pre_mlp_layernorm.weight"], hf[f"{h}.post_attention_layernorm.weight"])


def test_tokenizer_from_gguf_metadata(converted):
    from transformers import AutoTokenizer

    _, tokenizer, out = converted
    loaded = AutoTokenizer.from_pretrained(out / "tokenizer")
    text = "hello world, the lazy fox"
    assert loaded(text, add_special_tokens=False).input_ids == tokenizer(text).input_ids
    assert (loaded.eos_token_id, loaded.bos_token_id) == (EOS, BOS)
    chat = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_undo_rope_permutation_inverts_llama_cpp():
    from checkpoint_fixtures import llama_cpp_permute

    from megatron_lamina.checkpoint.gguf_reader import _undo_rope_permutation

    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    assert np.array_equal(_undo_rope_permutation(llama_cpp_permute(w, 6), 6), w)


def test_qwen2_gguf_matches_hf_conversion(tmp_path):
    """A qwen2 GGUF (q/k/v biases, no RoPE permutation in llama.cpp) converts to exactly what
    the Hugging Face path makes of the same model."""
    from checkpoint_fixtures import save_tiny_hf_model

    tokenizer = tiny_tokenizer()
    model = random_hf_model(hf_config("qwen2", vocab_size=len(tokenizer)))
    gguf_path = write_tiny_gguf(tmp_path / "qwen2.gguf", model, tokenizer, {}, architecture="qwen2")
    hf_dir = save_tiny_hf_model(model, tokenizer, tmp_path / "hf")
    assert run_tool("--source", "gguf", "--input", gguf_path, "--output", tmp_path / "from_gguf") == 0
    assert run_tool("--source", "hf", "--input", hf_dir, "--output", tmp_path / "from_hf") == 0
    from_gguf = load_file(tmp_path / "from_gguf" / "model.safetensors")
    from_hf = load_file(tmp_path / "from_hf" / "model.safetensors")
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in from_gguf
    assert from_gguf.keys() == from_hf.keys()
    for name, tensor in from_hf.items():
        assert torch.equal(from_gguf[name], tensor), name
    assert read_architecture(tmp_path / "from_gguf").qkv_bias
