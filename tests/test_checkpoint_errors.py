"""User errors of tools/convert_checkpoint.py (lamina convert): one `error: <file>: <reason>` line, exit code 2,
nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from checkpoint_fixtures import (
    REPO_ROOT,
    hf_config,
    random_hf_model,
    run_tool,
    save_tiny_hf_model,
    tiny_tokenizer,
    write_tiny_gguf,
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    return save_tiny_hf_model(random_hf_model(hf_config()), tokenizer, tmp_path_factory.mktemp("src") / "hf")


def _error_line(capsys, *args) -> str:
    assert run_tool(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def _hf_dir_with_config(tmp_path, hf_dir, **changes):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_missing_input(tmp_path, capsys):
    line = _error_line(capsys, "--source", "hf", "--input", tmp_path / "nope", "--output", tmp_path / "out")
    assert line == f"error: {tmp_path / 'nope'}: no such directory (expected a Hugging Face model directory)"
    line = _error_line(capsys, "--source", "gguf", "--input", tmp_path / "x.gguf", "--output", tmp_path / "out")
    assert line == f"error: {tmp_path / 'x.gguf'}: no such file (expected a .gguf file)"
    assert not (tmp_path / "out").exists()


def test_unknown_model_type(tmp_path, hf_dir, capsys):
    src = _hf_dir_with_config(tmp_path, hf_dir, model_type="gpt2")
    line = _error_line(capsys, "--source", "hf", "--input", src, "--output", tmp_path / "out")
    assert line == f"error: {src / 'config.json'}: model_type 'gpt2' is not supported; supported: llama, mistral, qwen2"


def test_unsupported_rope_type(tmp_path, hf_dir, capsys):
    src = _hf_dir_with_config(tmp_path, hf_dir, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    line = _error_line(capsys, "--source", "hf", "--input", src, "--output", tmp_path / "out")
    assert line == f"error: {src / 'config.json'}: rope type 'yarn' is not supported (supported: default, llama3)"


def test_missing_weights_and_tokenizer(tmp_path, hf_dir, capsys):
    src = _hf_dir_with_config(tmp_path, hf_dir)
    line = _error_line(capsys, "--source", "hf", "--input", src, "--output", tmp_path / "out")
    assert line.startswith(f"error: {src}: no weights (model.safetensors")
    (src / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    line = _error_line(capsys, "--source", "hf", "--input", src, "--output", tmp_path / "out")
    assert line.startswith(f"error: {src}: no tokenizer (tokenizer.json")


def test_unsupported_gguf_tensor_type(tmp_path, tokenizer, capsys):
    model = random_hf_model(hf_config(vocab_size=len(tokenizer)))
    path = write_tiny_gguf(tmp_path / "int.gguf", model, tokenizer, {"blk.1.ffn_down.weight": "I32"})
    line = _error_line(capsys, "--source", "gguf", "--input", path, "--output", tmp_path / "out")
    assert line.startswith(f"error: {path}: tensor blk.1.ffn_down.weight has type I32, which cannot be dequantized")


def test_unsupported_gguf_architecture_and_bad_file(tmp_path, tokenizer, capsys):
    model = random_hf_model(hf_config(vocab_size=len(tokenizer)))
    path = write_tiny_gguf(tmp_path / "arch.gguf", model, tokenizer, {}, architecture="gpt2")
    line = _error_line(capsys, "--source", "gguf", "--input", path, "--output", tmp_path / "out")
    assert line == f"error: {path}: GGUF architecture 'gpt2' is not supported; supported: llama, qwen2"
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    line = _error_line(capsys, "--source", "gguf", "--input", tmp_path / "bad.gguf", "--output", tmp_path / "out")
    assert line.startswith(f"error: {tmp_path / 'bad.gguf'}: not a readable GGUF file")


@pytest.mark.parametrize("damage, problem", [
    (lambda data: data[:100], "invalid header length"),                       # cut inside the header
    (lambda data: data[:-1000], "incomplete metadata, file not fully covered"),  # cut inside the tensors
    (lambda data: b"\0" * 50, "invalid JSON in header"),                       # not safetensors at all
])
def test_damaged_safetensors_named_and_nothing_written(tmp_path, hf_dir, capsys, damage, problem):
    (tmp_path / "src").mkdir()
    src = _hf_dir_with_config(tmp_path / "src", hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).symlink_to(hf_dir / name)
    (src / "model.safetensors").write_bytes(damage((hf_dir / "model.safetensors").read_bytes()))
    line = _error_line(capsys, "--source", "hf", "--input", src, "--output", tmp_path / "out")
    assert line.startswith(f"error: {src / 'model.safetensors'}: not a readable safetensors file, truncated or "
                           f"corrupt (") and problem in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary directory


def test_wrong_kind_of_path_or_source_says_what_to_pass(tmp_path, hf_dir, tokenizer, capsys):
    model = random_hf_model(hf_config(vocab_size=len(tokenizer)))
    gguf = write_tiny_gguf(tmp_path / "m.gguf", model, tokenizer, {})
    out = tmp_path / "out"
    cases = [
        (["hf", gguf], f"{gguf}: is a file, not a directory (expected a Hugging Face model directory); "
                       f"{gguf} looks like a --source gguf input"),
        (["gguf", hf_dir], f"{hf_dir}: is a directory, not a file (expected a .gguf file); "
                           f"{hf_dir} looks like a --source hf input"),
        (["megatron", hf_dir], f"{hf_dir}: neither a Megatron distributed checkpoint (metadata.json) nor a legacy "
                               f"one (mp_rank_* directories); {hf_dir} looks like a --source hf input"),
        (["deepspeed", gguf], f"{gguf}: is a file, not a directory (expected a DeepSpeed checkpoint directory); "
                              f"{gguf} looks like a --source gguf input"),
        (["gguf", hf_dir / "model.safetensors"], f"{hf_dir / 'model.safetensors'}: not a readable GGUF file (GGUF "
                                                 f"magic invalid); its directory {hf_dir} looks like a --source hf input"),
    ]
    for (source, path), message in cases:
        assert _error_line(capsys, "--source", source, "--input", path, "--output", out) == f"error: {message}"
    out.write_text("a file")
    line = _error_line(capsys, "--source", "hf", "--input", hf_dir, "--output", out, "--overwrite")
    assert line == f"error: {out}: is a file; --output names the directory to write the checkpoint in"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "out"]


def test_existing_output_needs_overwrite(tmp_path, hf_dir, capsys):
    out = tmp_path / "out"
    assert run_tool("--source", "hf", "--input", hf_dir, "--output", out, "--name", "old") == 0

    def name():
        return json.loads((out / "config.json").read_text())["source"].get("name")

    line = _error_line(capsys, "--source", "hf", "--input", hf_dir, "--output", out)
    assert line == f"error: {out}: already exists; pass --overwrite to replace it"
    assert name() == "old"

    # A conversion that fails (here on a tensor's shape, before writing) leaves the old output
    # and no temporary files.
    (tmp_path / "broken").mkdir()
    broken = _hf_dir_with_config(tmp_path / "broken", hf_dir, vocab_size=999)
    for file_name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (broken / file_name).symlink_to(hf_dir / file_name)
    line = _error_line(capsys, "--source", "hf", "--input", broken, "--output", out, "--overwrite")
    assert line == (f"error: {broken / 'model.safetensors'}: tensor model.embed_tokens.weight has shape (320, 64), "
                    "the architecture needs (999, 64)")
    assert name() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]

    assert run_tool("--source", "hf", "--input", hf_dir, "--output", out, "--overwrite") == 0
    assert name() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]


def test_cli_subprocess_help_and_error(tmp_path):
    """Runs as `python tools/convert_checkpoint.py` from any directory (set-up installs the package)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    tool = str(REPO_ROOT / "tools" / "convert_checkpoint.py")
    helped = subprocess.run([sys.executable, tool, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert helped.returncode == 0
    assert "--source hf --input" in helped.stdout and "--source gguf" in helped.stdout
    failed = subprocess.run(
        [sys.executable, tool, "--source", "hf", "--input", "missing", "--output", "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2
    assert failed.stderr.strip() == "error: missing: no such directory (expected a Hugging Face model directory)"
