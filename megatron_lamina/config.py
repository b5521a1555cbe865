"""The typed run configuration: one YAML file (plus `--set KEY=VALUE` overrides) turned into
checked dataclasses, one per section (DESIGN.md sections 2 and 10). The launchers call
`add_config_arguments` / `config_from_args` (or `load_config`) once at start-up, then every
rank calls `validate_layout` against the torchrun world size and the checkpoint's
`ModelArchitecture` before building anything; everything below reads the resulting
`LaminaConfig`. The sections' dataclass fields *are* the schema: the known keys, their
types (`int`, `float`, `str`, `Literal[...]` choices, unions of those), defaults and ranges
(field metadata) all come from them, so a new key is one new field. Every mistake a user
can make is a `ConfigError` whose message is one line naming the dotted key, the value and
what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from megatron_lamina.architecture import ModelArchitecture


class ConfigError(ValueError):
    """A mistake in the config a user can fix; str() is one line starting with 'config: '."""

    def __init__(self, message: str):
        assert "\n" not in message, message
        super().__init__(f"config: {message}")


def _key(default: Any = dataclasses.MISSING, *, min: float | None = None,
         max: float | None = None, above: float | None = None) -> Any:
    """A config key: its default (none = required) and the range of a numeric value
    (`min` <= value <= `max`, `above` < value)."""
    bounds = {"min": min, "max": max, "above": above}
    return field(default=default, metadata={k: v for k, v in bounds.items() if v is not None})


# ---------------------------------------------------------------------------------- sections

@dataclass
class ModelConfig:
    # A canonical checkpoint directory (tools/convert_checkpoint.py). A relative path is
    # relative to the launcher's working directory, not to the YAML file; kept as given.
    checkpoint: str = _key()
    dtype: Literal["float32", "bfloat16", "float16"] = _key("float32")


@dataclass
class ParallelConfig:
    tensor_parallel: int = _key(1, min=1)
    attention_workers: int = _key(0, min=0)  # 0: attention runs on the model workers (colocated)
    attention_head_groups: int = _key(1, min=1)  # attention workers form head_groups x request_shards


@dataclass
class RuntimeConfig:
    device: Literal["cpu", "cuda"] = _key("cpu")
    transport: Literal["auto", "gloo", "nccl"] = _key("auto")  # auto: nccl on cuda, gloo on cpu
    # A collective or P2P exchange that takes longer than this fails the job (a rank died or
    # hangs); the driver also sends an empty plan after this long idle / 4 as a heartbeat.
    step_timeout_s: float = _key(120.0, above=0.0)
    # CUDA only: replay steps from CUDA graphs, all captured at start-up (colocated decode
    # steps whole; every step's stages between attention calls at token buckets). At
    # tensor_parallel > 1 the TP group must be NCCL (not transport gloo).
    cuda_graphs: bool = _key(True)


@dataclass
class SchedulerConfig:
    max_batch_size: int = _key(64, min=1)  # requests in one step, over all micro-batches
    micro_batches: int = _key(2, min=1)  # staggered pipelining depth (DESIGN.md section 4)
    max_prefill_tokens: int = _key(2048, min=1)  # prompt tokens per step (chunked prefill)
    # Plan step n+1 while step n runs (its tokens fed on the device); false: plan after reading
    # step n back (same tokens, the GPU idles meanwhile).
    async_scheduling: bool = _key(True)


@dataclass
class KVCacheConfig:
    block_size: int = _key(16, min=1)  # tokens per KV block
    # Blocks in each KV cache (one per attention worker; per model worker when colocated);
    # auto: what memory_fraction leaves once the weights, graphs and activations are in place.
    num_blocks: Literal["auto"] | int = _key("auto", min=1)
    # Share of the whole device this process may use (vLLM's gpu_memory_utilization; ranks
    # sharing a GPU split it); with num_blocks auto the KV cache gets what is left of it.
    memory_fraction: float = _key(0.9, above=0.0, max=1.0)


@dataclass
class ServerConfig:
    host: str = _key("127.0.0.1")
    port: int = _key(8000, min=1, max=65535)
    max_queued_requests: int = _key(1024, min=1)  # waiting + running beyond this: 503
    drain_timeout_s: float = _key(30.0, min=0.0)  # SIGTERM: finish running requests this long
    # A bearer token every route but /health and /metrics requires (null: $LAMINA_API_KEY if set).
    api_key: str | None = _key(None)
    cors_origins: list[str] = field(default_factory=list)  # origins allowed by CORS ("*": any); empty: no CORS


@dataclass
class LaminaConfig:
    """The whole run configuration. `load_config` / `from_dict` check every value; building
    the dataclasses directly (as tests may) checks nothing."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    @property
    def world_size(self) -> int:
        """Ranks the torchrun job must have: the model workers, then the attention workers."""
        return self.parallel.tensor_parallel + self.parallel.attention_workers

    @property
    def colocated(self) -> bool:
        return self.parallel.attention_workers == 0

    @property
    def request_shards(self) -> int:
        """Independent KV pools a request can be placed on (1 when colocated)."""
        if self.colocated:
            return 1
        return self.parallel.attention_workers // self.parallel.attention_head_groups

    @property
    def torch_dtype(self):
        import torch  # here, so that reading a config does not pay for importing torch

        return getattr(torch, self.model.dtype)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "LaminaConfig":
        """Check a {section: {key: value}} mapping (as parsed from YAML) and build the config."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping of sections ({', '.join(_SECTIONS)}), "
                              f"got {type(data).__name__} {data!r}")
        for name in data:
            if name not in _SECTIONS:
                raise ConfigError(f"unknown section {str(name)!r} (known sections: {', '.join(_SECTIONS)})")
        sections = {name: _build_section(name, section_cls, data.get(name))
                    for name, section_cls in _SECTIONS.items()}
        return cls(**sections)


_SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(LaminaConfig)[f.name]
                              for f in dataclasses.fields(LaminaConfig)}


# -------------------------------------------------------------------------------- checking

def _build_section(name: str, section_cls: type, raw: Any) -> Any:
    if raw is None:  # `scheduler:` with every key commented out
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name} = {raw!r}: expected a mapping of keys "
                          f"({', '.join(_known_keys(section_cls))})")
    for key in raw:
        if key not in _known_keys(section_cls):
            raise ConfigError(f"unknown key {f'{name}.{key}'!r} "
                              f"(known keys in {name}: {', '.join(_known_keys(section_cls))})")
    hints = typing.get_type_hints(section_cls)
    values = {}
    for f in dataclasses.fields(section_cls):
        dotted = f"{name}.{f.name}"
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{dotted} is required: set it in the config file "
                                  f"or with --set {dotted}=VALUE")
            continue
        values[f.name] = _check_value(dotted, raw[f.name], hints[f.name], f.metadata)
    return section_cls(**values)


def _known_keys(section_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(section_cls)]


def _check_value(dotted: str, value: Any, annotation: Any, bounds: typing.Mapping[str, float]) -> Any:
    """Return `value` as a valid value of `annotation` (an int becomes a float for a float
    key), or raise a ConfigError that says what the key accepts."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for alternative in typing.get_args(annotation):
            ok, checked = _accepts(alternative, value, bounds)
            if ok:
                return checked
        described = " or ".join(_describe(a, bounds) for a in typing.get_args(annotation))
        raise ConfigError(f"{dotted} = {value!r}: must be {described}")
    ok, checked = _accepts(annotation, value, bounds)
    if ok:
        return checked
    if typing.get_origin(annotation) is Literal:
        raise ConfigError(f"{dotted} = {value!r}: allowed values are "
                          f"{', '.join(str(c) for c in typing.get_args(annotation))}")
    if _accepts(annotation, value, {})[0]:  # right type, out of range
        raise ConfigError(f"{dotted} = {value!r}: must be {_describe(annotation, bounds)}")
    raise ConfigError(f"{dotted} = {value!r}: expected {_describe(annotation, {})}")


def _accepts(annotation: Any, value: Any, bounds: typing.Mapping[str, float]) -> tuple[bool, Any]:
    if annotation is type(None):
        return value is None, value
    if typing.get_origin(annotation) is Literal:
        # type() as well as ==, so that true does not pass for 1 nor 1 for 1.0
        return any(type(value) is type(c) and value == c for c in typing.get_args(annotation)), value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float) if annotation is float else int):
            return False, value
        value = annotation(value)
        if annotation is float and value != value:  # NaN: in no range, and not a usable number
            return not bounds, value
        in_range = (("min" not in bounds or value >= bounds["min"])
                    and ("max" not in bounds or value <= bounds["max"])
                    and ("above" not in bounds or value > bounds["above"]))
        return in_range, value
    if annotation is str:
        return isinstance(value, str), value
    if typing.get_origin(annotation) is list:  # a list of one key type (server.cors_origins)
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_accepts(item, v, {})[0] for v in value), value
    raise AssertionError(f"config keys of type {annotation!r} are not supported yet")


def _describe(annotation: Any, bounds: typing.Mapping[str, float]) -> str:
    """'an integer >= 1', 'a number in (0, 1]', "'auto'", ... for error messages."""
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is Literal:
        return " or ".join(repr(c) for c in typing.get_args(annotation))
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a string"
    if typing.get_origin(annotation) is list:
        return f"a list of {_describe(typing.get_args(annotation)[0], {}).removeprefix('a ')}s"
    noun = "an integer" if annotation is int else "a number"
    lo, hi, above = bounds.get("min"), bounds.get("max"), bounds.get("above")
    if above is not None and hi is not None:
        return f"{noun} in ({above:g}, {hi:g}]"
    if lo is not None and hi is not None:
        return f"{noun} in {lo:g}..{hi:g}" if annotation is int else f"{noun} in [{lo:g}, {hi:g}]"
    if above is not None:
        return f"{noun} > {above:g}"
    if lo is not None:
        return f"{noun} >= {lo:g}"
    if hi is not None:
        return f"{noun} <= {hi:g}"
    return noun


# ---------------------------------------------------------------------------------- loading

def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> LaminaConfig:
    """Read the YAML file at `path` (None: start from the defaults), apply the `--set`
    overrides in order ("section.key=value", the value parsed as YAML) and check the result."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML{_yaml_where(e)}") from None
        if data is None:  # an empty file
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(_SECTIONS)}) "
                              f"at the top level, got {type(data).__name__}")
    for override in overrides:
        _apply_override(data, override)
    return LaminaConfig.from_dict(data)


def _yaml_where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line
    if mark is None:
        return f": {problem}"
    where = f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and context_mark is not None and context_mark.line != mark.line:
        where += f" ({' '.join(context.split())} started at line {context_mark.line + 1})"
    return where


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. scheduler.micro_batches=4")
    section, dot, name = key.partition(".")
    if not dot or not name:
        raise ConfigError(f"--set {override!r}: KEY must be SECTION.KEY "
                          f"(sections: {', '.join(_SECTIONS)})")
    if section not in _SECTIONS:
        raise ConfigError(f"unknown section {section!r} in --set {override!r} "
                          f"(known sections: {', '.join(_SECTIONS)})")
    if name not in _known_keys(_SECTIONS[section]):
        raise ConfigError(f"unknown key '{key}' (known keys in {section}: "
                          f"{', '.join(_known_keys(_SECTIONS[section]))})")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {override!r}: the value is not valid YAML{_yaml_where(e)}") from None
    if data.get(section) is None:
        data[section] = {}
    if not isinstance(data[section], dict):
        raise ConfigError(f"{section} = {data[section]!r}: expected a mapping of keys "
                          f"({', '.join(_known_keys(_SECTIONS[section]))})")
    data[section][name] = value


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config PATH` and repeatable `--set KEY=VALUE`, for the launchers and tools."""
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="YAML config (see configs/); without it every key has its default "
                             "and model.checkpoint must come from --set")
    parser.add_argument("--set", dest="config_overrides", metavar="KEY=VALUE", action="append",
                        default=[], help="override one config key, e.g. --set scheduler.micro_batches=4; "
                                         "repeatable, applied in order after the file")


def config_from_args(args: argparse.Namespace) -> LaminaConfig:
    return load_config(args.config, args.config_overrides)


# ----------------------------------------------------------------------------------- layout

def validate_layout(cfg: LaminaConfig, world_size: int, arch: ModelArchitecture) -> None:
    """Check that the config fits the torchrun job (`world_size` ranks) and the model's KV
    heads; called on every rank before any process group or model is built."""
    par = cfg.parallel
    if world_size != cfg.world_size:
        raise ConfigError(
            f"parallel.tensor_parallel ({par.tensor_parallel}) + parallel.attention_workers "
            f"({par.attention_workers}) = {cfg.world_size} but the job has {world_size} ranks; "
            f"start torchrun with --nproc-per-node {cfg.world_size} or change the config")
    kv_heads = arch.num_kv_heads
    divisors = ", ".join(str(d) for d in range(1, kv_heads + 1) if kv_heads % d == 0)
    if kv_heads % par.tensor_parallel:
        raise ConfigError(
            f"parallel.tensor_parallel = {par.tensor_parallel}: must divide the model's "
            f"{kv_heads} KV heads; allowed values are {divisors}")
    if kv_heads % par.attention_head_groups:
        raise ConfigError(
            f"parallel.attention_head_groups = {par.attention_head_groups}: must divide the "
            f"model's {kv_heads} KV heads; allowed values are {divisors}")
    if cfg.colocated and par.attention_head_groups > 1:
        raise ConfigError(
            f"parallel.attention_head_groups = {par.attention_head_groups}: must be 1 when "
            f"parallel.attention_workers = 0 (colocated: there are no attention workers to group)")
    if par.attention_workers % par.attention_head_groups:
        g = par.attention_head_groups
        raise ConfigError(
            f"parallel.attention_workers = {par.attention_workers}: must be a multiple of "
            f"parallel.attention_head_groups ({g}), one worker per head group and request "
            f"shard; allowed values are {g}, {2 * g}, {3 * g}, ...")
    if cfg.runtime.transport == "nccl" and cfg.runtime.device == "cpu":
        raise ConfigError(
            "runtime.transport = 'nccl': needs runtime.device = 'cuda'; with device cpu "
            "the allowed values are auto, gloo")
    if cfg.scheduler.micro_batches > cfg.scheduler.max_batch_size:
        raise ConfigError(
            f"scheduler.micro_batches = {cfg.scheduler.micro_batches}: must be <= "
            f"scheduler.max_batch_size ({cfg.scheduler.max_batch_size}), every micro-batch "
            f"needs at least one request")
