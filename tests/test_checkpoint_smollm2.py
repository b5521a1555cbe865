"""The default model, SmolLM2-135M-Instruct (Q4_1 GGUF): convert it and compare every tensor
with transformers' own GGUF loading of the same file (the independent reference; the
`smollm2` fixture is in conftest.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from megatron_lamina.architecture import read_architecture
from megatron_lamina.checkpoint.loader import CheckpointShardLoader
from megatron_lamina.checkpoint.layout import split_qkv

pytestmark = pytest.mark.xdist_group("smollm2")  # the `smollm2` session fixture: built once, on one worker (conftest)

# canonical name (layer part after decoder.layers.{i}.) -> transformers name(s)
LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def test_architecture(smollm2):
    _, out = smollm2
    arch = read_architecture(out)
    assert (arch.vocab_size, arch.hidden_size, arch.intermediate_size, arch.num_layers) == (49152, 576, 1536, 30)
    assert (arch.num_attention_heads, arch.num_kv_heads, arch.head_dim) == (9, 3, 64)
    assert arch.rope_theta == 100000.0 and arch.rope_scaling is None
    assert arch.tie_word_embeddings and not arch.qkv_bias
    assert arch.bos_token_id == 1 and arch.eos_token_ids == [2]  # <|im_start|>, <|im_end|>


def test_every_tensor_equals_transformers(smollm2):
    hf_model, out = smollm2
    hf = hf_model.state_dict()
    arch = read_architecture(out)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert torch.equal(f.get_tensor("embedding.word_embeddings.weight"), hf["model.embed_tokens.weight"])
        assert torch.equal(f.get_tensor("decoder.final_layernorm.weight"), hf["model.norm.weight"])
        assert "output_layer.weight" not in names
        checked = 2
        for i in range(arch.num_layers):
            p, h = f"decoder.layers.{i}", f"model.layers.{i}"
            q, k, v = split_qkv(f.get_tensor(f"{p}.self_attention.linear_qkv.weight"), arch)
            assert torch.equal(q, hf[f"{h}.self_attn.q_proj.weight"]), f"layer {i} q"
            assert torch.equal(k, hf[f"{h}.self_attn.k_proj.weight"]), f"layer {i} k"
            assert torch.equal(v, hf[f"{h}.self_attn.v_proj.weight"]), f"layer {i} v"
            fc1 = torch.cat([hf[f"{h}.mlp.gate_proj.weight"], hf[f"{h}.mlp.up_proj.weight"]])
            assert torch.equal(f.get_tensor(f"{p}.mlp.linear_fc1.weight"), fc1), f"layer {i} fc1"
            for canonical, hf_name in LAYER_NAMES.items():
                assert torch.equal(f.get_tensor(f"{p}.{canonical}"), hf[f"{h}.{hf_name}"]), f"{p}.{canonical}"
            checked += 2 + len(LAYER_NAMES)
    assert checked == len(names)


def test_tp3_shards(smollm2):
    """Each TP-3 rank's shard as Megatron lays it out, against the canonical tensors and
    transformers' own: vocabulary rows, whole KV groups of the fused QKV, the gate and up
    halves of fc1 sliced each (a rank's fc1 is its gate rows then its up rows, not a
    contiguous slice), columns of the output projection and fc2."""
    import dataclasses

    hf_model, out = smollm2
    hf = hf_model.state_dict()
    whole = CheckpointShardLoader(out)
    arch = whole.arch
    shards = [CheckpointShardLoader(out, t, 3) for t in range(3)]
    rank_arch = dataclasses.replace(arch, num_attention_heads=arch.num_attention_heads // 3,
                                    num_kv_heads=arch.num_kv_heads // 3)
    rows = arch.vocab_size // 3  # 49152 = 3 x 16384: no padding at TP 3
    p, h = "decoder.layers.7", "model.layers.7"
    gate, up = hf[f"{h}.mlp.gate_proj.weight"], hf[f"{h}.mlp.up_proj.weight"]
    inter, d = arch.intermediate_size // 3, arch.head_dim
    q_rows, kv_rows = rank_arch.num_attention_heads * d, rank_arch.num_kv_heads * d
    for t, shard in enumerate(shards):
        embedding = shard.tensor("embedding.word_embeddings.weight")
        assert torch.equal(embedding, hf["model.embed_tokens.weight"][t * rows:(t + 1) * rows])
        q, k, v = split_qkv(shard.tensor(f"{p}.self_attention.linear_qkv.weight"), rank_arch)
        assert torch.equal(q, hf[f"{h}.self_attn.q_proj.weight"][t * q_rows:(t + 1) * q_rows]), f"rank {t} q"
        assert torch.equal(k, hf[f"{h}.self_attn.k_proj.weight"][t * kv_rows:(t + 1) * kv_rows]), f"rank {t} k"
        assert torch.equal(v, hf[f"{h}.self_attn.v_proj.weight"][t * kv_rows:(t + 1) * kv_rows]), f"rank {t} v"
        fc1 = shard.tensor(f"{p}.mlp.linear_fc1.weight")
        assert torch.equal(fc1, torch.cat([gate[t * inter:(t + 1) * inter], up[t * inter:(t + 1) * inter]]))
        assert torch.equal(shard.tensor(f"{p}.self_attention.linear_proj.weight"),
                           hf[f"{h}.self_attn.o_proj.weight"][:, t * q_rows:(t + 1) * q_rows])
        assert torch.equal(shard.tensor(f"{p}.mlp.linear_fc2.weight"),
                           hf[f"{h}.mlp.down_proj.weight"][:, t * inter:(t + 1) * inter])
    # Contiguous slices of fc1 would be gate rows on rank 0 and up rows on rank 2: not the layout.
    name = f"{p}.mlp.linear_fc1.weight"
    assert not torch.equal(torch.cat([s.tensor(name) for s in shards]), whole.tensor(name))


def test_tp3_shards_pad_the_vocabulary(smollm2):
    """Padded to a multiple the vocabulary is not one of (Megatron's make_vocab_size_divisible_by
    x TP; 49152 is a multiple of 3 x 2^14, so any power of two divides it), the embedding's
    rows past the real vocabulary are zeros, all on the last rank, and the rest are the
    canonical rows."""
    _, out = smollm2
    canonical = CheckpointShardLoader(out).tensor("embedding.word_embeddings.weight")
    vocab = canonical.shape[0]
    shards = [CheckpointShardLoader(out, t, 3, make_vocab_size_divisible_by=1000) for t in range(3)]
    padded = shards[0].padded_vocab_size
    assert padded == 51000 and all(s.padded_vocab_size == padded for s in shards)
    parts = [s.tensor("embedding.word_embeddings.weight") for s in shards]
    assert [part.shape[0] for part in parts] == [padded // 3] * 3
    stitched = torch.cat(parts)
    assert torch.equal(stitched[:vocab], canonical)
    assert not stitched[vocab:].any() and stitched[vocab:].shape[0] == padded - vocab == 1848


def test_tokenizer_and_chat_template(smollm2):
    from transformers import AutoTokenizer

    _, out = smollm2
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.decode(tokenizer("Hello world").input_ids) == "Hello world"
    messages = [{"role": "user", "content": "hi"}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
