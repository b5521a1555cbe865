"""megatron_lamina.config: YAML -> typed config, overrides, and one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_lamina.architecture import ModelArchitecture
from megatron_lamina.config import (
    ConfigError,
    LaminaConfig,
    add_config_arguments,
    config_from_args,
    load_config,
    validate_layout,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

ARCH_2KV = ModelArchitecture(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                             num_attention_heads=4, num_kv_heads=2, head_dim=16,
                             max_position_embeddings=128)
ARCH_3KV = dataclasses.replace(ARCH_2KV, num_attention_heads=9, num_kv_heads=3)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lamina.yaml"
    path.write_text(text)
    return path


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return one_line(info)


def one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config: ")
    return message


def loaded(*overrides: str) -> LaminaConfig:
    return load_config(None, ["model.checkpoint=ckpt", *overrides])


# ----------------------------------------------------------------------------- loading

def test_defaults():
    cfg = loaded()
    assert cfg.model.checkpoint == "ckpt" and cfg.model.dtype == "float32"
    assert (cfg.parallel.tensor_parallel, cfg.parallel.attention_workers,
            cfg.parallel.attention_head_groups) == (1, 0, 1)
    assert (cfg.runtime.device, cfg.runtime.transport) == ("cpu", "auto")
    assert (cfg.scheduler.max_batch_size, cfg.scheduler.micro_batches,
            cfg.scheduler.max_prefill_tokens) == (64, 2, 2048)
    assert (cfg.kv_cache.block_size, cfg.kv_cache.num_blocks, cfg.kv_cache.memory_fraction) == (16, "auto", 0.9)
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8000)
    assert cfg.world_size == 1 and cfg.colocated and cfg.request_shards == 1
    assert cfg.torch_dtype is torch.float32


def test_minimal_file_gets_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  checkpoint: some/dir\nscheduler:\n"))
    assert cfg == loaded("model.checkpoint=some/dir")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):  # configs/*.yaml are engine configs; configs/planner/ holds prices
    cfg = load_config(path)
    assert cfg.model.checkpoint.startswith("checkpoints/")
    validate_layout(cfg, cfg.world_size, ARCH_3KV if cfg.runtime.device == "cpu" else
                    dataclasses.replace(ARCH_2KV, num_attention_heads=32, num_kv_heads=8))


def test_default_yaml_layout():
    cfg = load_config(CONFIGS / "default.yaml")
    assert cfg.model.checkpoint == "checkpoints/smollm2-135m-instruct"
    assert cfg.world_size == 3 and not cfg.colocated and cfg.request_shards == 2
    assert cfg.kv_cache.num_blocks == 256 and cfg.scheduler.max_batch_size == 32


def test_default_yaml_documents_every_key():
    """configs/default.yaml is the reference of the config: every key of every section is in it,
    on a line of its own with a comment."""
    import yaml

    from megatron_lamina.config import _SECTIONS

    text = (CONFIGS / "default.yaml").read_text()
    data = yaml.safe_load(text)
    for section, section_cls in _SECTIONS.items():
        keys = list(section_cls.model_fields)
        assert sorted(data[section]) == sorted(keys), section
        block = text.split(f"\n{section}:\n", 1)[1].split("\n\n", 1)[0].splitlines()
        for key in keys:
            line = [line for line in block if line.startswith(f"  {key}:")]
            assert len(line) == 1 and "#" in line[0].split(":", 1)[1], f"{section}.{key} has no comment"


def test_checkpoint_kept_as_given(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  checkpoint: ../rel/ckpt\n"))
    assert cfg.model.checkpoint == "../rel/ckpt"


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path, "model:\n  checkpoint: a\nkv_cache:\n  num_blocks: 8\n")
    cfg = load_config(path, ["scheduler.micro_batches=4", "kv_cache.num_blocks=auto",
                             "kv_cache.memory_fraction=1", "model.dtype=bfloat16",
                             "model.checkpoint=b=c", "server.host=0.0.0.0",
                             "parallel.attention_workers=2", "parallel.attention_workers=4"])
    assert cfg.scheduler.micro_batches == 4
    assert cfg.kv_cache.num_blocks == "auto"
    assert cfg.kv_cache.memory_fraction == 1.0 and isinstance(cfg.kv_cache.memory_fraction, float)
    assert cfg.model.dtype == "bfloat16" and cfg.torch_dtype is torch.bfloat16
    assert cfg.model.checkpoint == "b=c"
    assert cfg.server.host == "0.0.0.0"
    assert cfg.parallel.attention_workers == 4  # the last one wins
    assert cfg.request_shards == 4


def test_to_dict_round_trips():
    cfg = loaded("parallel.attention_workers=4", "parallel.attention_head_groups=2")
    d = cfg.to_dict()
    assert d["parallel"] == {"tensor_parallel": 1, "attention_workers": 4, "attention_head_groups": 2}
    assert list(d) == ["model", "parallel", "runtime", "scheduler", "kv_cache", "server", "deployment"]
    assert LaminaConfig.from_dict(d) == cfg
    assert cfg.request_shards == 2 and cfg.world_size == 5


def test_argparse_helpers(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    path = write(tmp_path, "model:\n  checkpoint: a\n")
    args = parser.parse_args(["--config", str(path), "--set", "server.port=9000",
                              "--set", "runtime.transport=gloo"])
    cfg = config_from_args(args)
    assert cfg.server.port == 9000 and cfg.runtime.transport == "gloo"
    assert config_from_args(parser.parse_args(["--set", "model.checkpoint=x"])).model.checkpoint == "x"


# ------------------------------------------------------------------------------ errors

def test_missing_file(tmp_path):
    message = config_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "no such file" in message


def test_yaml_syntax_error_names_the_line(tmp_path):
    message = config_error(write(tmp_path, "model:\n  checkpoint: a\nscheduler: [1, 2\n"))
    assert "lamina.yaml" in message and "line 4" in message


def test_top_level_not_a_mapping(tmp_path):
    assert "expected a mapping of sections" in config_error(write(tmp_path, "- 1\n- 2\n"))


def test_checkpoint_required(tmp_path):
    message = config_error(write(tmp_path, "scheduler:\n  micro_batches: 2\n"))
    assert "model.checkpoint is required" in message
    assert "model.checkpoint is required" in config_error(None)


def test_unknown_section(tmp_path):
    message = config_error(write(tmp_path, "model:\n  checkpoint: a\nschedular:\n  micro_batches: 2\n"))
    assert message == ("config: unknown section 'schedular' (known sections: model, parallel, "
                       "runtime, scheduler, kv_cache, server, deployment)")


def test_section_not_a_mapping(tmp_path):
    message = config_error(write(tmp_path, "model:\n  checkpoint: a\nscheduler: 3\n"))
    assert "scheduler = 3" in message and "max_batch_size" in message


def test_unknown_key(tmp_path):
    expected = ("config: unknown key 'scheduler.max_batch' (known keys in scheduler: "
                "max_batch_size, micro_batches, max_prefill_tokens, async_scheduling)")
    assert config_error(write(tmp_path, "model:\n  checkpoint: a\nscheduler:\n  max_batch: 3\n")) == expected
    assert config_error(None, ["model.checkpoint=a", "scheduler.max_batch=3"]) == expected


@pytest.mark.parametrize("override, expected", [
    ("scheduler.micro_batches", "expected KEY=VALUE"),
    ("micro_batches=2", "SECTION.KEY"),
    ("schedular.micro_batches=2", "unknown section 'schedular'"),
    ("server.host=[1", "not valid YAML"),
])
def test_bad_overrides(override, expected):
    message = config_error(None, ["model.checkpoint=a", override])
    assert expected in message and override in message


@pytest.mark.parametrize("override, expected", [
    # wrong type
    ("parallel.tensor_parallel=two", "config: parallel.tensor_parallel = 'two': expected an integer"),
    ("scheduler.max_batch_size=true", "config: scheduler.max_batch_size = True: expected an integer"),
    ("scheduler.max_batch_size=2.0", "config: scheduler.max_batch_size = 2.0: expected an integer"),
    ("kv_cache.memory_fraction=half", "config: kv_cache.memory_fraction = 'half': expected a number"),
    ("kv_cache.memory_fraction=true", "config: kv_cache.memory_fraction = True: expected a number"),
    ("model.checkpoint=123", "config: model.checkpoint = 123: expected a string"),
    ("server.host=", "config: server.host = None: expected a string"),
    # out of range
    ("scheduler.micro_batches=0", "config: scheduler.micro_batches = 0: must be an integer >= 1"),
    ("scheduler.max_prefill_tokens=-5", "config: scheduler.max_prefill_tokens = -5: must be an integer >= 1"),
    ("parallel.attention_workers=-1", "config: parallel.attention_workers = -1: must be an integer >= 0"),
    ("parallel.attention_head_groups=0", "config: parallel.attention_head_groups = 0: must be an integer >= 1"),
    ("kv_cache.block_size=0", "config: kv_cache.block_size = 0: must be an integer in 1..1024"),
    ("server.port=0", "config: server.port = 0: must be an integer in 1..65535"),
    ("server.port=70000", "config: server.port = 70000: must be an integer in 1..65535"),
    ("kv_cache.memory_fraction=0", "config: kv_cache.memory_fraction = 0: must be a number in (0, 1]"),
    ("kv_cache.memory_fraction=1.5", "config: kv_cache.memory_fraction = 1.5: must be a number in (0, 1]"),
    ("kv_cache.memory_fraction=.nan", "config: kv_cache.memory_fraction = nan: must be a number in (0, 1]"),
    # choices
    ("runtime.device=tpu", "config: runtime.device = 'tpu': allowed values are cpu, cuda"),
    ("runtime.transport=mpi", "config: runtime.transport = 'mpi': allowed values are auto, gloo, nccl"),
    ("model.dtype=fp8", "config: model.dtype = 'fp8': allowed values are float32, bfloat16, float16"),
    ("kv_cache.dtype=bfloat16", "config: kv_cache.dtype = 'bfloat16': allowed values are auto, fp8_e4m3"),
    ("kv_cache.num_blocks=0", "config: kv_cache.num_blocks = 0: must be 'auto' or an integer in 1..524288"),
    ("kv_cache.num_blocks=many", "config: kv_cache.num_blocks = 'many': must be 'auto' or an integer in 1..524288"),
    ("kv_cache.num_blocks=true", "config: kv_cache.num_blocks = True: must be 'auto' or an integer in 1..524288"),
])
def test_bad_values(override, expected):
    assert config_error(None, ["model.checkpoint=a", override]) == expected


def test_bad_value_in_file(tmp_path):
    path = write(tmp_path, "model:\n  checkpoint: a\nruntime:\n  device: tpu\n")
    assert config_error(path) == "config: runtime.device = 'tpu': allowed values are cpu, cuda"


# ------------------------------------------------------------------------------ layout

def layout_error(cfg: LaminaConfig, world_size: int, arch: ModelArchitecture) -> str:
    with pytest.raises(ConfigError) as info:
        validate_layout(cfg, world_size, arch)
    return one_line(info)


def test_valid_layouts():
    validate_layout(loaded(), 1, ARCH_2KV)
    validate_layout(loaded("parallel.tensor_parallel=2", "parallel.attention_workers=4",
                           "parallel.attention_head_groups=2"), 6, ARCH_2KV)
    validate_layout(loaded("parallel.tensor_parallel=3", "parallel.attention_workers=3",
                           "parallel.attention_head_groups=3"), 6, ARCH_3KV)
    validate_layout(loaded("runtime.device=cuda", "runtime.transport=nccl"), 1, ARCH_2KV)
    validate_layout(loaded("scheduler.max_batch_size=2", "scheduler.micro_batches=2"), 1, ARCH_2KV)


def test_world_size_mismatch():
    cfg = loaded("parallel.attention_workers=2")
    assert layout_error(cfg, 4, ARCH_2KV) == (
        "config: parallel.tensor_parallel (1) + parallel.attention_workers (2) = 3 but the job "
        "has 4 ranks; start torchrun with --nproc-per-node 3 or change the config")


@pytest.mark.parametrize("arch, tp, allowed", [(ARCH_2KV, 3, "1, 2"), (ARCH_3KV, 2, "1, 3"),
                                               (ARCH_2KV, 4, "1, 2")])
def test_tensor_parallel_must_divide_kv_heads(arch, tp, allowed):
    message = layout_error(loaded(f"parallel.tensor_parallel={tp}"), tp, arch)
    assert f"parallel.tensor_parallel = {tp}" in message
    assert f"{arch.num_kv_heads} KV heads" in message
    assert message.endswith(f"allowed values are {allowed}")


@pytest.mark.parametrize("arch, groups, allowed", [(ARCH_2KV, 3, "1, 2"), (ARCH_3KV, 2, "1, 3")])
def test_head_groups_must_divide_kv_heads(arch, groups, allowed):
    cfg = loaded("parallel.attention_workers=6", f"parallel.attention_head_groups={groups}")
    message = layout_error(cfg, 7, arch)
    assert f"parallel.attention_head_groups = {groups}" in message
    assert f"{arch.num_kv_heads} KV heads" in message
    assert message.endswith(f"allowed values are {allowed}")


def test_attention_workers_multiple_of_head_groups():
    cfg = loaded("parallel.attention_workers=3", "parallel.attention_head_groups=2")
    message = layout_error(cfg, 4, ARCH_2KV)
    assert "parallel.attention_workers = 3" in message
    assert "parallel.attention_head_groups (2)" in message
    assert "allowed values are 2, 4, 6" in message


def test_head_groups_need_attention_workers():
    cfg = loaded("parallel.attention_head_groups=2")
    message = layout_error(cfg, 1, ARCH_2KV)
    assert "parallel.attention_head_groups = 2" in message
    assert "must be 1" in message and "parallel.attention_workers = 0" in message


def test_nccl_needs_cuda():
    message = layout_error(loaded("runtime.transport=nccl"), 1, ARCH_2KV)
    assert "runtime.transport = 'nccl'" in message and "runtime.device = 'cuda'" in message
    assert "allowed values are auto, gloo" in message


def test_micro_batches_at_most_max_batch_size():
    cfg = loaded("scheduler.max_batch_size=2", "scheduler.micro_batches=3")
    message = layout_error(cfg, 1, ARCH_2KV)
    assert "scheduler.micro_batches = 3" in message and "scheduler.max_batch_size (2)" in message


@pytest.mark.parametrize("override, message", [
    ("server.cors_origins=5", "config: server.cors_origins = 5: expected a list of strings"),
    ("server.cors_origins=[1]", "config: server.cors_origins = 1: expected a list of strings"),
    ("server.api_key=3", "config: server.api_key = 3: must be a string or null"),
])
def test_server_list_and_optional_keys(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.checkpoint=x", override])
    assert str(e.value) == message
    assert load_config(None, ["model.checkpoint=x", "server.cors_origins=[a, b]"]).server.cors_origins == ["a", "b"]


@pytest.mark.parametrize("override, expected", [  # issue 23: values that passed and then crashed a rank
    ("runtime.step_timeout_s=.inf", "config: runtime.step_timeout_s = inf: must be a number in (0, 86400]"),
    ("runtime.step_timeout_s=.nan", "config: runtime.step_timeout_s = nan: must be a number in (0, 86400]"),
    ("server.drain_timeout_s=.inf", "config: server.drain_timeout_s = inf: must be a number in [0, 86400]"),
    ("server.drain_timeout_s=.nan", "config: server.drain_timeout_s = nan: must be a number in [0, 86400]"),
    ("server.stall_timeout_s=.inf", "config: server.stall_timeout_s = inf: must be a number in (0, 86400]"),
    ("kv_cache.block_size=1000000000", "config: kv_cache.block_size = 1000000000: must be an integer in 1..1024"),
    ("kv_cache.num_blocks=1000000000",
     "config: kv_cache.num_blocks = 1000000000: must be 'auto' or an integer in 1..524288"),
])
def test_infinite_timeouts_and_sizes_that_cannot_fit(override, expected):
    assert config_error(None, ["model.checkpoint=a", override]) == expected


def test_largest_timeouts_and_sizes_pass():
    cfg = loaded("runtime.step_timeout_s=86400", "server.drain_timeout_s=86400", "server.stall_timeout_s=86400",
                 "kv_cache.block_size=1024", "kv_cache.num_blocks=524288")
    assert (cfg.runtime.step_timeout_s, cfg.kv_cache.block_size, cfg.kv_cache.num_blocks) == (86400, 1024, 524288)


def test_colocated_layouts_run_one_micro_batch():
    """Colocated, micro-batches overlap nothing and only one micro-batch replays whole-step CUDA
    graphs: a larger scheduler.micro_batches runs as 1 (and start-up says so); disaggregated
    layouts keep the value."""
    assert loaded("parallel.attention_workers=0", "scheduler.micro_batches=2").micro_batches == 1
    assert loaded("parallel.attention_workers=2", "scheduler.micro_batches=3").micro_batches == 3
    assert load_config(CONFIGS / "gpu-colocated.yaml").scheduler.micro_batches == 1
    assert load_config(CONFIGS / "colocated-cpu.yaml").scheduler.micro_batches == 1
