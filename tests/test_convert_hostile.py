"""Hostile checkpoints given to `lamina convert` (tools/convert_checkpoint.py): each is refused with one
`error: <file>: <what, and what was expected>` line, exit status 2, and nothing written.

The checkpoints are built with the real writers (safetensors, torch.save, gguf's GGUFWriter,
torch.distributed.checkpoint for Megatron's torch_dist layout) from the tiny models of
checkpoint_fixtures, then damaged one way each: the tensors' dtypes, the tensors' shapes, the
architecture's values, shards missing or cut short, non-finite weights, an output that cannot
be written, and an --output that is not (only) a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from checkpoint_fixtures import REPO_ROOT, hf_config, random_hf_model, run_tool, save_tiny_hf_model, tiny_tokenizer, write_tiny_gguf
from safetensors.torch import load_file, save_file

from megatron_lamina.architecture import ModelArchitecture

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return random_hf_model(hf_config(vocab_size=len(tokenizer)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, model, tokenizer):
    return save_tiny_hf_model(model, tokenizer, tmp_path_factory.mktemp("src") / "hf")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _refused(capsys, root: Path, *args) -> str:
    """Run the converter, expecting exit status 2, one `error:` line on stderr and no change
    under `root` (which holds the source and the --output)."""
    before = _tree(root)
    assert run_tool(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert _tree(root) == before
    return err[0]


def _hf_copy(root: Path, hf_dir: Path, config: dict | None = None, weights: dict | None = None,
             drop: tuple[str, ...] = ()) -> Path:
    """A Hugging Face directory like `hf_dir`, config.json updated with `config` (keys in `drop`
    removed) and, given `weights`, a model.safetensors of those tensors."""
    src = root / "src"
    src.mkdir()
    data = json.loads((hf_dir / "config.json").read_text())
    data.update(config or {})
    for key in drop:
        data.pop(key, None)
    (src / "config.json").write_text(json.dumps(data))
    for name in TOKENIZER_FILES:
        (src / name).symlink_to(hf_dir / name)
    if weights is None:
        (src / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    else:
        save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    return src


def _convert_hf(capsys, root: Path, src: Path, *options) -> str:
    return _refused(capsys, root, "--source", "hf", "--input", src, "--output", root / "out", *options)


# -- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, shown", [
    (torch.int64, "I64"), (torch.bool, "BOOL"), (torch.uint8, "U8"),
])  # fmt: skip
def test_integer_and_bool_weights(tmp_path, hf_dir, capsys, dtype, shown):
    weights = load_file(hf_dir / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name] = weights[name].to(dtype)
    src = _hf_copy(tmp_path, hf_dir, weights=weights)
    line = _convert_hf(capsys, tmp_path, src)
    assert line == f"error: {src / 'model.safetensors'}: tensor {name} has dtype {shown}, expected floating point weights"


def test_complex_weights_in_a_torch_save(tmp_path, hf_dir, capsys):
    weights = load_file(hf_dir / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    weights[name] = weights[name].to(torch.complex64)
    src = _hf_copy(tmp_path, hf_dir)
    (src / "model.safetensors").unlink()
    torch.save(weights, src / "pytorch_model.bin")
    line = _convert_hf(capsys, tmp_path, src)
    assert line == f"error: {src / 'pytorch_model.bin'}: tensor {name} has dtype complex64, expected floating point weights"


# -- shapes ---------------------------------------------------------------------------------


def test_tensor_of_the_wrong_shape(tmp_path, hf_dir, capsys):
    weights = load_file(hf_dir / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"  # 2 KV heads x 16 = 32 rows, not 64
    weights[name] = torch.zeros(64, 64)
    src = _hf_copy(tmp_path, hf_dir, weights=weights)
    line = _convert_hf(capsys, tmp_path, src)
    assert line == f"error: {src / 'model.safetensors'}: tensor {name} has shape (64, 64), the architecture needs (32, 64)"


@pytest.mark.parametrize("drop, bare, missing", [
    ("model.layers.1.mlp.up_proj.weight", False, "model.layers.1.mlp.up_proj.weight"),
    ("model.layers.1.mlp.up_proj.weight", True, "layers.1.mlp.up_proj.weight"),
    ("lm_head.weight", False, "lm_head.weight (tie_word_embeddings is false in config.json)"),
])  # fmt: skip
def test_missing_tensor(tmp_path, hf_dir, capsys, drop, bare, missing):
    """A tensor the architecture needs and the weights lack is named as the save would name it
    (without "model." in a bare LlamaModel's save), with the setting that asks for it."""
    weights = load_file(hf_dir / "model.safetensors")
    del weights[drop]
    if bare:
        weights = {name.removeprefix("model."): w for name, w in weights.items()}
    src = _hf_copy(tmp_path, hf_dir, weights=weights)
    assert _convert_hf(capsys, tmp_path, src) == f"error: {src}: no tensor {missing}"


def test_huge_vocab_and_layer_count_are_checked_against_the_file_first(tmp_path, hf_dir, capsys):
    """A vocab_size of 10^12 is a shape error from the file's header (no 256 TB tensor is made);
    10^12 layers are compared with the file's before anything loops over them."""
    (tmp_path / "vocab").mkdir()
    src = _hf_copy(tmp_path / "vocab", hf_dir, {"vocab_size": 10**12})
    line = _convert_hf(capsys, tmp_path / "vocab", src)
    assert line == (f"error: {src / 'model.safetensors'}: tensor model.embed_tokens.weight has shape (288, 64), "
                    f"the architecture needs ({10**12}, 64)")
    (tmp_path / "layers").mkdir()
    src = _hf_copy(tmp_path / "layers", hf_dir, {"num_hidden_layers": 10**12})
    line = _convert_hf(capsys, tmp_path / "layers", src)
    assert line == f"error: {src}: config.json's num_hidden_layers is {10**12}, but the weights hold layers 0-1"


def test_gguf_tensor_of_the_wrong_shape(tmp_path, model, tokenizer, capsys):
    wrong = random_hf_model(hf_config(vocab_size=len(tokenizer), intermediate_size=96))
    wrong.config.intermediate_size = 128  # the metadata says 128, the tensors hold 96
    path = write_tiny_gguf(tmp_path / "m.gguf", wrong, tokenizer, {})
    line = _refused(capsys, tmp_path, "--source", "gguf", "--input", path, "--output", tmp_path / "out")
    assert line == f"error: {path}: tensor blk.0.ffn_gate.weight has shape (96, 64), the architecture needs (128, 64)"


# -- the architecture's values --------------------------------------------------------------


@pytest.mark.parametrize("config, drop, problem", [
    ({"rope_theta": math.nan}, ("rope_parameters",), "rope_theta is nan, expected a positive finite number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, (),
     "rope_parameters.rope_theta is -1.0, expected a positive finite number"),
    ({"hidden_size": -64}, (), "hidden_size is -64, expected a positive integer"),
    ({"hidden_size": "64"}, (), "hidden_size is '64', expected a positive integer"),
    ({"num_attention_heads": 0}, (), "num_attention_heads is 0, expected a positive integer"),
    ({"num_key_value_heads": 0}, (), "num_key_value_heads is 0, expected a positive integer"),
    ({"num_key_value_heads": 3}, (), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"num_attention_heads": 5, "num_key_value_heads": 5}, ("head_dim",),
     "hidden_size 64 is not divisible by num_attention_heads 5 (the head size is their quotient)"),
    ({"rms_norm_eps": math.inf}, (), "rms_norm_eps is inf, expected a positive finite number"),
    ({"eos_token_id": 5000}, (), "eos_token_id 5000 is not a token id of the vocabulary (0 to 287)"),
    ({"tie_word_embeddings": "no"}, (), "tie_word_embeddings is 'no', expected true or false"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 4.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}, (),
     "rope_parameters.high_freq_factor 4.0 is not above low_freq_factor 4.0"),
])  # fmt: skip
def test_hf_architecture_values(tmp_path, hf_dir, capsys, config, drop, problem):
    src = _hf_copy(tmp_path, hf_dir, config, drop=drop)
    assert _convert_hf(capsys, tmp_path, src) == f"error: {src / 'config.json'}: {problem}"


@pytest.mark.parametrize("content, kind", [("[1, 2]", "list"), ('"llama"', "string")])
def test_config_json_that_is_not_an_object(tmp_path, hf_dir, capsys, content, kind):
    src = _hf_copy(tmp_path, hf_dir)
    (src / "config.json").write_text(content)
    line = _convert_hf(capsys, tmp_path, src)
    assert line == f"error: {src / 'config.json'}: holds a JSON {kind}, expected an object (a Hugging Face model config)"


def test_gguf_architecture_values(tmp_path, tokenizer, capsys):
    model = random_hf_model(hf_config(vocab_size=len(tokenizer)))
    model.config.rope_parameters["rope_theta"] = math.nan
    path = write_tiny_gguf(tmp_path / "nan.gguf", model, tokenizer, {})
    line = _refused(capsys, tmp_path, "--source", "gguf", "--input", path, "--output", tmp_path / "out")
    assert line == f"error: {path}: llama.rope.freq_base is nan, expected a positive finite number"
    model.config.rope_parameters["rope_theta"] = 10000.0
    model.config.max_position_embeddings = 0
    path = write_tiny_gguf(tmp_path / "zero.gguf", model, tokenizer, {})
    line = _refused(capsys, tmp_path, "--source", "gguf", "--input", path, "--output", tmp_path / "out")
    assert line == f"error: {path}: llama.context_length is 0, expected a positive integer"


# -- shards ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_hf_dir(tmp_path_factory, model, tokenizer):
    path = save_tiny_hf_model(model, tokenizer, tmp_path_factory.mktemp("src") / "sharded", max_shard_size="100KB")
    assert len(list(path.glob("model-*.safetensors"))) > 1
    return path


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_hf_shard_missing_or_truncated(tmp_path, sharded_hf_dir, capsys, damage):
    src = shutil.copytree(sharded_hf_dir, tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-100])
    line = _convert_hf(capsys, tmp_path, src)
    if damage == "missing":
        assert line == f"error: {shard}: listed in the weight index but missing"
    else:
        assert line.startswith(f"error: {shard}: not a readable safetensors file, truncated or corrupt (")


def _write_torch_dist(directory: Path, tokenizer, fc2_columns: int = 128) -> Path:
    """A Megatron-LM torch_dist save of a tiny untied model (one writer, layers stacked as
    Megatron stacks them), written with torch.distributed.checkpoint as dist_checkpointing
    writes it, with Megatron-LM's training arguments in common.pt."""
    import torch.distributed.checkpoint as dcp
    from ckpt_save_megatron import megatron_lm_args

    arch = ModelArchitecture(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2,
                             num_attention_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    args = megatron_lm_args(arch, "unused", tp=1, pp=1, ckpt_format="torch_dist")
    layers, hidden, qkv_rows = arch.num_layers, arch.hidden_size, (4 + 2 * 2) * 16
    generator = torch.Generator().manual_seed(0)
    state = {
        "embedding.word_embeddings.weight": (args.padded_vocab_size, hidden),
        "decoder.layers.input_layernorm.weight": (layers, hidden),
        "decoder.layers.self_attention.linear_qkv.weight": (layers, qkv_rows, hidden),
        "decoder.layers.self_attention.linear_proj.weight": (layers, hidden, 64),
        "decoder.layers.pre_mlp_layernorm.weight": (layers, hidden),
        "decoder.layers.mlp.linear_fc1.weight": (layers, 256, hidden),
        "decoder.layers.mlp.linear_fc2.weight": (layers, hidden, fc2_columns),
        "decoder.final_layernorm.weight": (hidden,),
        "output_layer.weight": (args.padded_vocab_size, hidden),
    }
    state = {name: torch.randn(shape, generator=generator) for name, shape in state.items()}
    iteration = directory / "iter_0000010"
    iteration.mkdir(parents=True)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(iteration), no_dist=True)
    (iteration / "metadata.json").write_text(json.dumps({
        "sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
        "common_backend_version": 1,
    }))  # fmt: skip
    torch.save({"args": args, "iteration": 10, "checkpoint_version": 3.0}, iteration / "common.pt")
    (directory / "latest_checkpointed_iteration.txt").write_text("10")
    return directory


@pytest.fixture(scope="module")
def torch_dist_dir(tmp_path_factory, tokenizer):
    return _write_torch_dist(tmp_path_factory.mktemp("src") / "torch_dist", tokenizer)


def test_torch_dist_fixture_converts(tmp_path, torch_dist_dir, hf_dir):
    """The undamaged save converts: what the tests below refuse is their damage alone."""
    out = tmp_path / "out"
    assert run_tool("--source", "megatron", "--input", torch_dist_dir, "--tokenizer", hf_dir, "--output", out) == 0
    assert load_file(out / "model.safetensors")["decoder.layers.1.mlp.linear_fc2.weight"].shape == (64, 128)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_torch_dist_shard_missing_or_truncated(tmp_path, torch_dist_dir, hf_dir, capsys, damage):
    src = shutil.copytree(torch_dist_dir, tmp_path / "src")
    shard = src / "iter_0000010" / "__0_0.distcp"
    size = shard.stat().st_size
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: size // 2])
    line = _refused(capsys, tmp_path, "--source", "megatron", "--input", src, "--tokenizer", hf_dir,
                    "--output", tmp_path / "out")
    if damage == "missing":
        assert line.startswith(f"error: {shard}: missing (a shard holding tensor ")
    else:
        assert line.startswith(f"error: {shard}: truncated: {size // 2} bytes, tensor ")


def test_torch_dist_tensor_of_the_wrong_shape(tmp_path, tokenizer, hf_dir, capsys):
    src = _write_torch_dist(tmp_path / "src", tokenizer, fc2_columns=120)
    line = _refused(capsys, tmp_path, "--source", "megatron", "--input", src, "--tokenizer", hf_dir,
                    "--output", tmp_path / "out")
    assert line == (f"error: {src / 'iter_0000010'}: tensor decoder.layers.0.mlp.linear_fc2.weight has shape (64, 120), "
                    "the architecture needs (64, 128)")


@pytest.mark.parametrize("args, problem", [
    ({"num_attention_heads": 0}, "num_attention_heads is 0, expected a positive integer"),
    ({"num_query_groups": 3}, "num_attention_heads 4 is not a multiple of num_query_groups 3"),
    ({"hidden_size": "64"}, "hidden_size is '64', expected a positive integer"),
    ({"rotary_base": float("nan")}, "rotary_base is nan, expected a positive finite number"),
])  # fmt: skip
def test_megatron_argument_values(tmp_path, torch_dist_dir, hf_dir, capsys, args, problem):
    config = tmp_path / "args.json"
    config.write_text(json.dumps(args))
    line = _refused(capsys, tmp_path, "--source", "megatron", "--input", torch_dist_dir, "--tokenizer", hf_dir,
                    "--model-config", config, "--output", tmp_path / "out")
    assert line == f"error: {torch_dist_dir / 'iter_0000010' / 'common.pt'}: {problem}"


# -- finite weights -------------------------------------------------------------------------


def test_nan_weights(tmp_path, hf_dir, capsys):
    weights = load_file(hf_dir / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][3] = math.nan  # one row: the sample sees it
    src = _hf_copy(tmp_path, hf_dir, weights=weights)
    line = _convert_hf(capsys, tmp_path, src)
    assert line == f"error: {src}: tensor decoder.layers.0.mlp.linear_fc2.weight holds NaN or infinite values"


def test_one_nan_found_by_check_all_weights(tmp_path, hf_dir, capsys):
    weights = load_file(hf_dir / "model.safetensors")
    weights["model.embed_tokens.weight"][100, 7] = math.inf
    src = _hf_copy(tmp_path, hf_dir, weights=weights)
    line = _convert_hf(capsys, tmp_path, src, "--check-all-weights")
    assert line == f"error: {src}: tensor embedding.word_embeddings.weight holds NaN or infinite values"


def test_nan_weights_in_gguf(tmp_path, tokenizer, capsys):
    model = random_hf_model(hf_config(vocab_size=len(tokenizer)))
    with torch.no_grad():
        model.model.norm.weight.fill_(math.nan)
    path = write_tiny_gguf(tmp_path / "nan.gguf", model, tokenizer, {})
    line = _refused(capsys, tmp_path, "--source", "gguf", "--input", path, "--output", tmp_path / "out")
    assert line == f"error: {path}: tensor decoder.final_layernorm.weight holds NaN or infinite values"


def test_values_beyond_the_output_dtype(tmp_path, hf_dir, capsys):
    weights = load_file(hf_dir / "model.safetensors")
    weights["lm_head.weight"][0, 0] = 1e6  # finite in float32, infinite in float16
    src = _hf_copy(tmp_path, hf_dir, weights=weights)
    line = _convert_hf(capsys, tmp_path, src, "--dtype", "float16", "--check-all-weights")
    assert line == (f"error: {src}: tensor output_layer.weight has values beyond float16's range; "
                    "convert with --dtype bfloat16 or float32")


# -- the output -----------------------------------------------------------------------------


def test_read_only_output(tmp_path, hf_dir, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    with _read_only(parent):
        line = _refused(capsys, tmp_path, "--source", "hf", "--input", hf_dir, "--output", parent / "out")
    assert line.startswith(f"error: {parent / 'out'}: cannot write the checkpoint: "), line
    assert list(parent.iterdir()) == []


class _read_only:
    """`directory` made unwritable for this process: chmod for a user, the immutable attribute
    for root (whom permissions do not stop); skipped where neither is possible."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __enter__(self):
        if os.geteuid() != 0:
            self.directory.chmod(0o555)
        elif subprocess.run(["chattr", "+i", str(self.directory)], capture_output=True).returncode != 0:
            pytest.skip("root, and chattr +i is not available here: no way to make a directory read-only")
        return self

    def __exit__(self, *exc):
        if os.geteuid() != 0:
            self.directory.chmod(0o755)
        else:
            subprocess.run(["chattr", "-i", str(self.directory)], check=True)


def test_full_output_disk(tmp_path, hf_dir):
    """A file-size limit fails the write as a full disk does (EFBIG for ENOSPC); run in a
    child process, since the limit binds the whole process."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "convert_checkpoint.py"), "--source", "hf", "--input", str(hf_dir),
         "--output", str(out)],
        preexec_fn=limit_file_size, capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {out}: cannot write the checkpoint: File too large"
    assert list(tmp_path.iterdir()) == []


def test_overwrite_refuses_a_directory_holding_other_files(tmp_path, hf_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = _refused(capsys, tmp_path, "--source", "hf", "--input", hf_dir, "--output", out, "--overwrite")
    assert line == (f"error: {out}: is not a megatron-lamina checkpoint (holds notes.txt); --overwrite replaces only "
                    "a checkpoint, so choose another --output")
    # A checkpoint with something added is no longer only a checkpoint.
    (out / "notes.txt").unlink()
    assert run_tool("--source", "hf", "--input", hf_dir, "--output", out) == 0  # an empty directory is fine
    (out / "notes.txt").write_text("mine")
    _refused(capsys, tmp_path, "--source", "hf", "--input", hf_dir, "--output", out, "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_never_deletes_an_input(tmp_path, model, tokenizer, capsys):
    out = tmp_path / "out"
    gguf = write_tiny_gguf(tmp_path / "m.gguf", model, tokenizer, {})
    assert run_tool("--source", "gguf", "--input", gguf, "--output", out) == 0
    inside = shutil.move(gguf, out / "m.gguf")
    line = _refused(capsys, tmp_path, "--source", "gguf", "--input", inside, "--output", out, "--overwrite")
    assert line == f"error: {out}: holds {inside}, an input of this conversion; choose another --output"
    assert Path(inside).is_file()
