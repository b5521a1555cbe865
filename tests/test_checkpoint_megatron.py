"""Megatron checkpoints -> canonical -> served: torch_dist and legacy mp_rank (TP=2, TP=2 x PP=2).

The checkpoints (see checkpoint_fixtures.FrameworkCheckpoints): a real Megatron-core GPTModel
split over two gloo ranks saved with `dist_checkpointing.save` (Megatron-LM's torch_dist
layout with its args, the same with per-layer keys and with the keys under a wrapper's
prefix, and a bare megatron-core save without args) and as per-rank
`model_optim_rng.pt` files (legacy, TP=2); and a TP=2 x PP=2 legacy save sliced by hand
from Megatron's conventions. All hold the untied tiny LLaMA of conftest, with the padded
vocabulary rows filled with noise. Converted, each must equal the Hugging Face conversion of
that model tensor for tensor, and served (TP=2 + an attention worker; all but the two
torch_dist variants) give transformers' greedy tokens and logits within 1e-4.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from checkpoint_fixtures import assert_served_matches_transformers, run_tool
from safetensors.torch import load_file

from megatron_lamina.architecture import read_architecture

pytestmark = pytest.mark.xdist_group("frameworks")  # the `frameworks` session fixture: built once, on one worker (conftest)

MEGATRON = ["torch_dist", "torch_dist_per_layer", "legacy_tp2", "legacy_tp2_pp2", "mcore_no_args",
            "torch_dist_wrapped"]
SERVED = ["torch_dist", "legacy_tp2", "legacy_tp2_pp2"]


@pytest.mark.parametrize("name", SERVED)
def test_served_matches_transformers(frameworks, name):
    assert_served_matches_transformers(frameworks, name)


@pytest.mark.parametrize("name", MEGATRON)
def test_tensors_equal_hf_conversion(frameworks, name):
    """TP shards merged, fc1 halves put back, the padded vocabulary cut: exactly the tensors
    the Hugging Face path makes of the same model."""
    expected = load_file(frameworks.reference[name].canonical_dir / "model.safetensors")
    got = load_file(frameworks.converted[name] / "model.safetensors")
    assert got.keys() == expected.keys()
    for tensor_name, tensor in expected.items():
        assert torch.equal(got[tensor_name], tensor), tensor_name


@pytest.mark.parametrize("name", MEGATRON)
def test_architecture_and_provenance(frameworks, name):
    expected = read_architecture(frameworks.reference[name].canonical_dir)
    arch = read_architecture(frameworks.converted[name])
    assert arch == expected  # vocab 256 from the tokenizer, not the padded 400
    config = json.loads((frameworks.converted[name] / "config.json").read_text())
    assert config["dtype"] == "float32"  # args.bf16 and args.fp16 are false
    source = config["source"]
    assert source["kind"] == "megatron"
    assert source["format"] == ("torch" if name.startswith("legacy") else "torch_dist")
    if name == "torch_dist":
        assert source["iteration"] == 10 and source["name"] == "tiny-megatron"
        assert source["path"].endswith("iter_0000010")  # found through latest_checkpointed_iteration.txt
    if name == "legacy_tp2_pp2":
        assert (source["tensor_parallel"], source["pipeline_parallel"], source["iteration"]) == (2, 2, 20)
    if name == "legacy_tp2":
        assert source["tokenizer"] == str(frameworks.tokenizer_model)  # args.tokenizer_model


def test_sentencepiece_tokenizer_as_megatron_encodes(frameworks):
    """GPTSentencePieceTokenizer (args.tokenizer_type) encodes without BOS; the converted
    tokenizer gives the same ids as sentencepiece itself."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(frameworks.tokenizer_model))
    tokenizer = AutoTokenizer.from_pretrained(frameworks.converted["legacy_tp2"] / "tokenizer")
    text = "w12 w13 the quick brown fox w399"
    assert tokenizer(text).input_ids == sp.encode(text)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (1, 2, 256)
    assert tokenizer.decode(sp.encode(text)) == text


# -- wrong input ------------------------------------------------------------------------------


def _error(capsys, *args) -> str:
    assert run_tool(*args) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def _copy(frameworks, name, tmp_path):
    return shutil.copytree(frameworks.sources[name], tmp_path / name)


def test_missing_shard_and_mismatched_shard_count(frameworks, tmp_path, capsys):
    src = _copy(frameworks, "legacy_tp2_pp2", tmp_path)
    iteration = src / "iter_0000020"
    shutil.rmtree(iteration / "mp_rank_01_000")
    line = _error(capsys, "--source", "megatron", "--input", src, "--output", tmp_path / "out")
    assert line.startswith(f"error: {iteration / 'mp_rank_01_000'}: missing: tensor-parallel ranks 0-1 x pipeline")
    shutil.rmtree(iteration / "mp_rank_01_001")  # now a consistent TP=1 x PP=2 grid, but args say TP=2
    line = _error(capsys, "--source", "megatron", "--input", src, "--output", tmp_path / "out")
    assert line == (
        f"error: {iteration}: has 1 tensor-parallel shard(s), but the training arguments say tensor_model_parallel_size=2"
    )
    assert not (tmp_path / "out").exists()


def test_missing_arguments_and_tokenizer(frameworks, tmp_path, capsys):
    src = frameworks.sources["mcore_no_args"]
    line = _error(capsys, "--source", "megatron", "--input", src, "--output", tmp_path / "out")
    assert (
        line
        == f"error: {src}: no tokenizer: pass --tokenizer (a SentencePiece tokenizer.model or a Hugging Face tokenizer dir)"
    )
    tokenizer = ["--tokenizer", frameworks.tokenizer_model]
    line = _error(capsys, "--source", "megatron", "--input", src, "--output", tmp_path / "out", *tokenizer)
    assert line.startswith(
        f"error: {src}: no training arguments give num_layers, hidden_size, num_attention_heads; pass --model-config"
    )


def test_unsupported_architecture(frameworks, tmp_path, capsys):
    config = tmp_path / "layernorm.json"
    config.write_text(json.dumps({"normalization": "LayerNorm"}))
    src = frameworks.sources["torch_dist"]
    args = [
        "--source",
        "megatron",
        "--input",
        src,
        "--output",
        tmp_path / "out",
        "--tokenizer",
        frameworks.tokenizer_model,
    ]
    line = _error(capsys, *args, "--model-config", config)
    assert (
        line
        == f"error: {src / 'iter_0000010' / 'common.pt'}: normalization 'LayerNorm' is not supported (a LLaMA-style decoder is)"
    )
    config.write_text(json.dumps({"num_layers": 3}))
    line = _error(capsys, *args, "--model-config", config)
    assert line == f"error: {src / 'iter_0000010'}: num_layers is 3, but the weights hold layers 0-1"


def test_not_a_megatron_checkpoint(frameworks, tmp_path, capsys):
    line = _error(capsys, "--source", "megatron", "--input", tmp_path, "--output", tmp_path / "out")
    assert line == (
        f"error: {tmp_path}: neither a Megatron distributed checkpoint (metadata.json) nor a legacy one (mp_rank_* directories)"
    )
    src = _copy(frameworks, "mcore_no_args", tmp_path)
    (src / "metadata.json").write_text(
        json.dumps(
            {
                "sharded_backend": "zarr",
                "sharded_backend_version": 1,
                "common_backend": "torch",
                "common_backend_version": 1,
            }
        )
    )
    line = _error(capsys, "--source", "megatron", "--input", src, "--output", tmp_path / "out")
    assert line.startswith(f"error: {src / 'metadata.json'}: sharded backend 'zarr' is not supported (only torch_dist)")


# Megatron-core names -> those of the pre-core model of older Megatron-LM (layer part only).
PRE_CORE_LAYER_NAMES = {
    "input_layernorm.weight": "input_norm.weight",
    "self_attention.linear_qkv.weight": "self_attention.query_key_value.weight",
    "self_attention.linear_proj.weight": "self_attention.dense.weight",
    "pre_mlp_layernorm.weight": "post_attention_norm.weight",
    "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
}


def test_pre_core_legacy_model(frameworks, tmp_path):
    """Older Megatron-LM saves its pre-core model as nested dicts under "language_model"
    (embedding / encoder / output_layer) with its own names; same tensors otherwise."""
    src = _copy(frameworks, "legacy_tp2", tmp_path)
    for path in src.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        encoder = {}
        for name, tensor in state["model"].items():
            if name.startswith("decoder.layers.") and not name.endswith("_extra_state"):
                _, _, layer, part = name.split(".", 3)
                encoder[f"layers.{layer}.{PRE_CORE_LAYER_NAMES[part]}"] = tensor
        encoder["final_norm.weight"] = state["model"]["decoder.final_layernorm.weight"]
        state["model"] = {"language_model": {
            "embedding": {"word_embeddings": {"weight": state["model"]["embedding.word_embeddings.weight"]}},
            "encoder": encoder,
            "output_layer": {"weight": state["model"]["output_layer.weight"]},
        }}  # fmt: skip
        torch.save(state, path)
    assert run_tool("--source", "megatron", "--input", src, "--output", tmp_path / "out") == 0
    expected = load_file(frameworks.converted["legacy_tp2"] / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())


def test_model_config_overrides_stored_args(frameworks, tmp_path):
    """--model-config overrides stored arguments (names with dashes too); bf16 training means
    --dtype auto writes bfloat16; Megatron's LLaMA-3.1 RoPE scaling is recorded."""
    config = tmp_path / "args.json"
    config.write_text(json.dumps({"--bf16": True, "use-rope-scaling": True, "rope_scaling_factor": 4.0}))
    out = tmp_path / "out"
    tokenizer = ["--tokenizer", frameworks.tokenizer_model]
    assert run_tool("--source", "megatron", "--input", frameworks.sources["legacy_tp2_pp2"], "--output", out,
                    "--model-config", config, *tokenizer) == 0  # fmt: skip
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    scaling = read_architecture(out).rope_scaling
    assert (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor) == (4.0, 1.0, 4.0)
    assert scaling.original_max_position_embeddings == 8192
    got = load_file(out / "model.safetensors")
    expected = load_file(frameworks.converted["legacy_tp2_pp2"] / "model.safetensors")
    assert all(torch.equal(got[name], tensor.bfloat16()) for name, tensor in expected.items())
