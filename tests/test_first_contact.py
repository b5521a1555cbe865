"""First contact (issue 23): what a new user meets before the first answer. A Hugging Face
directory or a GGUF file as model.checkpoint, converted once into the cache (threads racing
for it convert once), an unknown directory's error naming what to run, relative paths beside
the config file then in the working directory, the ordinary flags (`--port` ... as `--set`),
`lamina --version` and the keys in the help, one `error:` line for a device torch cannot
use (in the launcher and at a rank's start), `LLM.generate` with `n` and a dict of
parameters, `megatron_lamina.SamplingParams`."""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from checkpoint_fixtures import hf_config, random_hf_model, tiny_tokenizer, write_tiny_gguf
from tiny_models import save_tiny_llama

from megatron_lamina.checkpoint.auto_convert import canonical_checkpoint
from megatron_lamina.checkpoint.errors import CheckpointInputError
from megatron_lamina.config import _SECTIONS, FLAGS, add_config_arguments, config_from_args

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("first") / "tiny-hf", tied=False)


# ------------------------------------------------------------------------- auto-conversion

def test_hf_directory_is_converted_once_and_cached(hf_dir, tmp_path):
    environ = {"LAMINA_CACHE_DIR": str(tmp_path / "cache")}
    lines: list[str] = []
    results: list[str] = []

    def convert():
        results.append(canonical_checkpoint(str(hf_dir), log=lines.append, environ=environ))

    threads = [threading.Thread(target=convert) for _ in range(3)]  # three ranks at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and Path(results[0]).parent == tmp_path / "cache"
    assert sum(line.startswith("converting") for line in lines) == 1  # the lock: one conversion
    assert canonical_checkpoint(results[0]) == results[0]  # a canonical directory is used as it is
    lines.clear()
    assert canonical_checkpoint(str(hf_dir), log=lines.append, environ=environ) == results[0] and not lines
    (hf_dir / "config.json").touch()  # an edited source is converted again
    assert canonical_checkpoint(str(hf_dir), log=lines.append, environ=environ) != results[0]


def test_gguf_file_is_converted(tmp_path):
    model = random_hf_model(hf_config())
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", model, tiny_tokenizer(), {})
    out = canonical_checkpoint(str(gguf), environ={"LAMINA_CACHE_DIR": str(tmp_path / "cache")})
    assert (Path(out) / "model.safetensors").is_file() and Path(out).name.startswith("tiny-")


def test_unknown_directory_says_what_it_is_and_what_to_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointInputError, match="a directory without a config.json.*lamina convert"):
        canonical_checkpoint(str(tmp_path / "empty"))
    megatron = tmp_path / "megatron"
    megatron.mkdir()
    (megatron / "latest_checkpointed_iteration.txt").write_text("10")
    with pytest.raises(CheckpointInputError, match=r"megatron checkpoint.*`lamina convert --source megatron --input"):
        canonical_checkpoint(str(megatron))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointInputError, match="a file that is not a GGUF file"):
        canonical_checkpoint(str(tmp_path / "notes.txt"))


def test_relative_checkpoint_beside_the_config_then_the_working_directory(hf_dir, tmp_path, monkeypatch):
    configs, elsewhere = tmp_path / "configs", tmp_path / "elsewhere"
    (configs / "ckpt").mkdir(parents=True)
    elsewhere.mkdir()
    ckpt = Path(canonical_checkpoint(str(hf_dir), environ={"LAMINA_CACHE_DIR": str(tmp_path / "cache")}))
    for f in ckpt.rglob("*"):
        if f.is_file():
            (configs / "ckpt" / f.relative_to(ckpt)).parent.mkdir(parents=True, exist_ok=True)
            (configs / "ckpt" / f.relative_to(ckpt)).write_bytes(f.read_bytes())
    config = configs / "job.yaml"
    config.write_text("model:\n  checkpoint: ckpt\n")
    monkeypatch.chdir(elsewhere)
    assert canonical_checkpoint("ckpt", config) == str(configs / "ckpt")
    monkeypatch.chdir(configs)
    assert canonical_checkpoint("ckpt", None) == str(configs / "ckpt")  # the working directory
    monkeypatch.chdir(elsewhere)
    with pytest.raises(CheckpointInputError) as e:
        canonical_checkpoint("nothing", config)
    assert str(configs / "nothing") in str(e.value) and str(elsewhere / "nothing") in str(e.value)


# ---------------------------------------------------------------------------------- flags

def test_flags_are_set_overrides(tmp_path):
    cfg = config_from_args(parse("some/model", "--port", "8001", "--host", "0.0.0.0", "--api-key", "123",
                                 "--tensor-parallel", "1", "--attention-workers", "2", "--max-batch-size", "8"))
    assert cfg.model.checkpoint == "some/model"
    assert (cfg.server.port, cfg.server.host, cfg.server.api_key) == (8001, "0.0.0.0", "123")
    assert (cfg.parallel.attention_workers, cfg.scheduler.max_batch_size) == (2, 8)
    # a flag is a --set of its key: after the file, and --set (the most explicit) last
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  checkpoint: a\nserver:\n  port: 9000\n")
    assert config_from_args(parse("--config", str(config), "--port", "9001")).server.port == 9001
    assert config_from_args(parse("--config", str(config), "--port", "9001", "--set", "server.port=9002")).server.port == 9002
    assert set(key for key, _ in FLAGS.values()) == {"server.host", "server.port", "server.api_key",
                                                     "parallel.tensor_parallel", "parallel.attention_workers",
                                                     "scheduler.max_batch_size"}


def test_version_and_every_key_in_the_help():
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "megatron_lamina.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and version("megatron-lamina") in out.stdout
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    for section, cls in _SECTIONS.items():
        for key in cls.model_fields:
            assert f"\n  {section}.{key} = " in parser.epilog, f"{section}.{key}"


# --------------------------------------------------------------------------------- device

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_cuda_on_a_cpu_torch_is_one_error_line(hf_dir, tmp_path, capsys, monkeypatch):
    env = {"LAMINA_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "megatron_lamina.cli", "generate", str(hf_dir), "--set",
                          "runtime.device=cuda", "--input", str(ROOT / "examples" / "chat.jsonl"),
                          "--output", str(tmp_path / "out.jsonl")], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [out.stderr.strip()] and out.stderr.startswith("error: config: runtime.device")
    # a rank's start-up (torchrun's path) says the same in one line
    from megatron_lamina.worker.runtime import job_from_args

    monkeypatch.setenv("LAMINA_CACHE_DIR", str(tmp_path / "cache"))
    assert job_from_args(parse(str(hf_dir), "--set", "runtime.device=cuda")) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: config: runtime.device = 'cuda'")


# ------------------------------------------------------------------------------ Python API

def test_llm_takes_n_a_dict_and_a_hf_directory(hf_dir, tmp_path, monkeypatch):
    import megatron_lamina
    from megatron_lamina import SamplingParams

    assert SamplingParams is megatron_lamina.requests.sampling_params.SamplingParams
    monkeypatch.setenv("LAMINA_CACHE_DIR", str(tmp_path / "cache"))
    with megatron_lamina.LLM(str(hf_dir), num_blocks=64, block_size=4) as llm:
        two = llm.generate(["w5 w9", "w7"], {"max_tokens": 4, "temperature": 0.9, "seed": 7, "n": 2, "ignore_eos": True})
        assert len(two) == 4  # prompt-major: prompt 0 samples 0, 1, then prompt 1
        params = [SamplingParams(max_tokens=4, temperature=0.9, seed=s, ignore_eos=True) for s in (7, 8)]
        assert [g.token_ids for g in two[:2]] == [g.token_ids for g in llm.generate(["w5 w9"] * 2, params)]
        assert [g.token_ids for g in llm.generate("w7", SamplingParams(max_tokens=4, temperature=0.9, seed=7,
                                                                       ignore_eos=True), n=2)] == \
            [g.token_ids for g in two[2:]]
        with pytest.raises(ValueError, match="unknown sampling parameter 'temprature'"):
            llm.generate("w7", {"temprature": 0.5})
