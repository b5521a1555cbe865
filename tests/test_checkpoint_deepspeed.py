"""DeepSpeed ZeRO checkpoints -> canonical -> served, saved by a real DeepSpeed engine.

tests/ckpt_save_deepspeed.py runs `deepspeed.initialize` + `engine.save_checkpoint` on two
gloo ranks (DeepSpeed's CPU accelerator) for ZeRO stages 1, 2 and 3 of the tied tiny LLaMA
(transformers), and for a Megatron-DeepSpeed-named module holding the same weights. The
converter consolidates them with DeepSpeed's zero_to_fp32; each conversion must equal the
Hugging Face conversion of the model tensor for tensor, and served (TP=2 + an attention
worker) give transformers' greedy tokens and logits within 1e-4.
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

DEEPSPEED = ["zero1", "zero2", "zero3", "megatron_deepspeed"]


@pytest.mark.parametrize("name", DEEPSPEED)
def test_served_matches_transformers(frameworks, name):
    assert_served_matches_transformers(frameworks, name)


@pytest.mark.parametrize("name", DEEPSPEED)
def test_consolidated_tensors_equal_hf_conversion(frameworks, name):
    """Both ranks' fp32 partitions put together (and the tied lm_head, a shared parameter,
    left out) are exactly the model's weights."""
    expected = load_file(frameworks.reference[name].canonical_dir / "model.safetensors")
    got = load_file(frameworks.converted[name] / "model.safetensors")
    assert got.keys() == expected.keys()
    for tensor_name, tensor in expected.items():
        assert torch.equal(got[tensor_name], tensor), tensor_name
    assert read_architecture(frameworks.converted[name]) == read_architecture(frameworks.reference[name].canonical_dir)


@pytest.mark.parametrize("name", DEEPSPEED)
def test_provenance(frameworks, name):
    config = json.loads((frameworks.converted[name] / "config.json").read_text())
    assert config["dtype"] == "float32"
    source = config["source"]
    assert source["kind"] == "deepspeed"
    assert source["model"] == ("megatron" if name == "megatron_deepspeed" else "hf")
    assert source["zero_stage"] == {"zero1": 1, "zero3": 3}.get(name, 2)
    assert source["path"].endswith("global_step7" if name == "megatron_deepspeed" else "global_step1")


def _error(capsys, *args) -> str:
    assert run_tool(*args) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_missing_rank_partition(frameworks, tmp_path, capsys):
    src = shutil.copytree(frameworks.sources["zero2"], tmp_path / "zero2")
    (src / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    line = _error(capsys, "--source", "deepspeed", "--input", src, "--output", tmp_path / "out")
    assert line.startswith(f"error: {src / 'global_step1'}: cannot consolidate the ZeRO shards (Expected 2 of")
    assert not (tmp_path / "out").exists()


def test_missing_config_and_not_deepspeed(frameworks, tmp_path, capsys):
    src = tmp_path / "zero1"
    shutil.copytree(frameworks.sources["zero1"], src, ignore=shutil.ignore_patterns("config.json"))
    line = _error(capsys, "--source", "deepspeed", "--input", src, "--output", tmp_path / "out")
    assert line == f"error: {src}: no config.json for this Hugging Face model; pass --model-config CONFIG.json"
    line = _error(capsys, "--source", "deepspeed", "--input", tmp_path, "--output", tmp_path / "out")
    assert (
        line == f"error: {tmp_path}: not a DeepSpeed checkpoint (neither a 'latest' file nor *_optim_states.pt files)"
    )


def test_option_not_for_source(frameworks, tmp_path, capsys):
    hf_dir = frameworks.reference["zero1"].hf_dir
    line = _error(capsys, "--source", "hf", "--input", hf_dir, "--output", tmp_path / "out", "--tokenizer", hf_dir)
    assert line == "error: --tokenizer does not apply to --source hf"


def test_help_documents_every_source(capsys):
    with pytest.raises(SystemExit):
        run_tool("--help")
    help_text = capsys.readouterr().out
    for source in ("hf", "gguf", "megatron", "deepspeed"):
        assert f"--source {source} " in help_text, source
    assert "--model-config" in help_text and "--tokenizer" in help_text and "--name" in help_text
