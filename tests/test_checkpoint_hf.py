"""Hugging Face -> canonical conversion of tiny random LLaMA / Qwen2 models, and TP loading."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_fixtures import run_tool, save_tiny_hf_model, hf_config, random_hf_model, tiny_tokenizer
from safetensors.torch import load_file

from megatron_lamina.architecture import FORMAT, read_architecture
from megatron_lamina.checkpoint.loader import CheckpointShardLoader

CASES = {
    # name: (model_type, tied, weights, max_shard_size, config overrides)
    "llama-untied-safetensors": ("llama", False, "safetensors", None, {}),
    "llama-tied-sharded": ("llama", True, "safetensors", "40KB", {}),
    "llama-untied-bin": ("llama", False, "bin", None, {"eos_token_id": [3, 1]}),
    "qwen2-bias-odd-vocab": ("qwen2", False, "safetensors", None, {"vocab_size": 321}),
}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory, tokenizer):
    """(hf model, canonical checkpoint dir) per case, converted with the tool."""
    model_type, tie, weights, shard, overrides = CASES[request.param]
    model = random_hf_model(hf_config(model_type, tie=tie, **overrides))
    root = tmp_path_factory.mktemp(request.param)
    src = save_tiny_hf_model(model, tokenizer, root / "hf", weights=weights, max_shard_size=shard)
    if shard:
        assert (src / "model.safetensors.index.json").is_file()
    assert run_tool("--source", "hf", "--input", src, "--output", root / "canonical") == 0
    return model, root / "canonical"


def test_config_matches_hf(converted):
    model, out = converted
    c = model.config
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == FORMAT and config["dtype"] == "float32" and config["tokenizer"] == "tokenizer"
    assert config["source"]["kind"] == "hf"
    arch = read_architecture(out)
    assert (arch.vocab_size, arch.hidden_size, arch.intermediate_size, arch.num_layers) == (
        c.vocab_size,
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
    )
    assert (arch.num_attention_heads, arch.num_kv_heads, arch.head_dim) == (
        c.num_attention_heads,
        c.num_key_value_heads,
        c.hidden_size // c.num_attention_heads,
    )
    assert arch.max_position_embeddings == c.max_position_embeddings
    assert arch.rms_norm_eps == c.rms_norm_eps
    assert arch.rope_theta == c.rope_parameters["rope_theta"] and arch.rope_scaling is None
    assert arch.tie_word_embeddings == c.tie_word_embeddings
    assert arch.qkv_bias == (c.model_type == "qwen2")
    assert arch.bos_token_id == c.bos_token_id
    eos = c.eos_token_id if isinstance(c.eos_token_id, list) else [c.eos_token_id]
    assert arch.eos_token_ids == eos


def test_tensors_match_hf(converted):
    model, out = converted
    c = model.config
    hf = model.state_dict()
    ckpt = load_file(out / "model.safetensors")
    heads, kv, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    qpk = heads // kv
    expected = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"}
    assert torch.equal(ckpt["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(ckpt["decoder.final_layernorm.weight"], hf["model.norm.weight"])
    if not c.tie_word_embeddings:
        expected.add("output_layer.weight")
        assert torch.equal(ckpt["output_layer.weight"], hf["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p, h = f"decoder.layers.{i}", f"model.layers.{i}"
        kinds = ["weight", "bias"] if c.model_type == "qwen2" else ["weight"]
        for kind in kinds:
            fused = ckpt[f"{p}.self_attention.linear_qkv.{kind}"]
            # The documented layout: per KV group g, its qpk query heads, its k head, its v head.
            for g in range(kv):
                block = fused[g * (qpk + 2) * d : (g + 1) * (qpk + 2) * d]
                q_rows = hf[f"{h}.self_attn.q_proj.{kind}"][g * qpk * d : (g + 1) * qpk * d]
                assert torch.equal(block[: qpk * d], q_rows)
                k_rows = hf[f"{h}.self_attn.k_proj.{kind}"][g * d : (g + 1) * d]
                v_rows = hf[f"{h}.self_attn.v_proj.{kind}"][g * d : (g + 1) * d]
                assert torch.equal(block[qpk * d : (qpk + 1) * d], k_rows)
                assert torch.equal(block[(qpk + 1) * d :], v_rows)
            assert fused.shape[0] == (heads + 2 * kv) * d
            expected.add(f"{p}.self_attention.linear_qkv.{kind}")
        fc1 = torch.cat([hf[f"{h}.mlp.gate_proj.weight"], hf[f"{h}.mlp.up_proj.weight"]])
        renamed = {
            f"{p}.input_layernorm.weight": hf[f"{h}.input_layernorm.weight"],
            f"{p}.self_attention.linear_proj.weight": hf[f"{h}.self_attn.o_proj.weight"],
            f"{p}.pre_mlp_layernorm.weight": hf[f"{h}.post_attention_layernorm.weight"],
            f"{p}.mlp.linear_fc1.weight": fc1,
            f"{p}.mlp.linear_fc2.weight": hf[f"{h}.mlp.down_proj.weight"],
        }
        for name, tensor in renamed.items():
            assert torch.equal(ckpt[name], tensor), name
        expected |= set(renamed)
    assert set(ckpt) == expected


def test_tp2_shards_reassemble(converted):
    _, out = converted
    whole = CheckpointShardLoader(out, 0, 1)
    shards = [CheckpointShardLoader(out, t, 2, dtype=torch.bfloat16) for t in range(2)]
    arch = whole.arch
    assert shards[0].padded_vocab_size == -(-arch.vocab_size // 2) * 2
    names = list(load_file(out / "model.safetensors"))
    if arch.tie_word_embeddings:
        names.append("output_layer.weight")  # resolves to the embedding
    for name in names:
        full = whole.tensor(name).to(torch.bfloat16)
        parts = [s.tensor(name) for s in shards]
        assert all(p.dtype == torch.bfloat16 for p in parts)
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            cat = torch.cat(parts)
            assert cat.shape[0] == shards[0].padded_vocab_size
            assert torch.equal(cat[: arch.vocab_size], full[: arch.vocab_size])
            assert not cat[arch.vocab_size :].any(), "padded vocab rows must be zero"
        elif name.endswith("linear_fc1.weight"):
            gates, ups = zip(*(p.chunk(2) for p in parts))
            assert torch.equal(torch.cat(gates + ups), full)
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            assert torch.equal(torch.cat(parts, dim=1), full)
        elif "linear_qkv" in name:
            assert torch.equal(torch.cat(parts), full)
            # Rank t holds whole KV groups: its first rows are the queries of group t*kv/tp.
            group_rows = (arch.queries_per_kv_head + 2) * arch.head_dim
            assert torch.equal(parts[1][:group_rows], full[(arch.num_kv_heads // 2) * group_rows :][:group_rows])
        else:
            assert all(torch.equal(p, full) for p in parts)


def _module_with_parameters(shapes: dict[str, torch.Size]) -> torch.nn.Module:
    """An nn.Module tree whose named_parameters() are exactly `shapes`."""
    module = torch.nn.Module()
    for name, shape in shapes.items():
        owner = module
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, torch.nn.Parameter(torch.empty(shape)))
    return module


def test_load_into_module(converted):
    """load_into fills parameters by Megatron name and checks names, shapes and coverage."""
    _, out = converted
    loader = CheckpointShardLoader(out, 1, 2)
    shapes = {name: loader.tensor(name).shape for name in load_file(out / "model.safetensors")}
    module = _module_with_parameters(shapes)
    loader.load_into(module)
    for name, param in module.named_parameters():
        assert torch.equal(param, loader.tensor(name)), name

    fc2 = "decoder.layers.1.mlp.linear_fc2.weight"
    with pytest.raises(ValueError, match=rf"{fc2} has shape \(3, 3\), but the checkpoint's TP rank 1/2 shard"):
        loader.load_into(_module_with_parameters({**shapes, fc2: (3, 3)}))
    with pytest.raises(ValueError, match="no tensor for parameter decoder.bogus.weight"):
        loader.load_into(_module_with_parameters({**shapes, "decoder.bogus.weight": (4,)}))
    fewer_layers = {name: shape for name, shape in shapes.items() if ".layers.1." not in name}
    with pytest.raises(ValueError, match="tensors not used by the model: decoder.layers.1."):
        loader.load_into(_module_with_parameters(fewer_layers))
    loader.load_into(_module_with_parameters(fewer_layers), strict=False)


def test_tokenizer_round_trips(converted, tokenizer):
    from transformers import AutoTokenizer

    _, out = converted
    loaded = AutoTokenizer.from_pretrained(out / "tokenizer")
    text = "hello world, the lazy fox"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.eos_token == "<|im_end|>"
    chat = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_dtype_and_llama3_rope(tmp_path, tokenizer):
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    model = random_hf_model(hf_config(rope_parameters=rope))
    src = save_tiny_hf_model(model, tokenizer, tmp_path / "hf")
    assert run_tool("--source", "hf", "--input", src, "--output", tmp_path / "out", "--dtype", "bfloat16") == 0
    arch = read_architecture(tmp_path / "out")
    assert arch.rope_theta == 500000.0
    assert arch.rope_scaling.factor == 8.0 and arch.rope_scaling.original_max_position_embeddings == 64
    ckpt = load_file(tmp_path / "out" / "model.safetensors")
    assert ckpt["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    assert torch.equal(ckpt["embedding.word_embeddings.weight"], model.model.embed_tokens.weight.bfloat16())


def test_mistral_sliding_window_caps_context(tmp_path, tokenizer):
    from transformers import MistralConfig

    config = MistralConfig(**{**hf_config().to_dict(), "sliding_window": 128, "model_type": "mistral"})
    src = save_tiny_hf_model(random_hf_model(config), tokenizer, tmp_path / "hf")
    assert run_tool("--source", "hf", "--input", src, "--output", tmp_path / "out") == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"]["max_position_embeddings"] == 128
    assert config["source"]["model_type"] == "mistral"
    assert "capped to sliding_window 128" in config["source"]["notes"][0]


def test_transformer_engine_norm_names(converted):
    """TE layer specs fuse the norms into linear_qkv / linear_fc1; the loader maps them."""
    _, out = converted
    loader = CheckpointShardLoader(out, 0, 2)
    p = "decoder.layers.1"
    assert torch.equal(
        loader.tensor(f"{p}.self_attention.linear_qkv.layer_norm_weight"), loader.tensor(f"{p}.input_layernorm.weight")
    )
    assert torch.equal(
        loader.tensor(f"{p}.mlp.linear_fc1.layer_norm_weight"), loader.tensor(f"{p}.pre_mlp_layernorm.weight")
    )
