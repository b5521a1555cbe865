"""The typed run configuration: one YAML file (plus `--set KEY=VALUE` overrides) turned into
checked pydantic models, one per section (DESIGN.md sections 2 and 10). The launchers call
`add_config_arguments` / `config_from_args` (or `load_config`) once at start-up, then every
rank calls `validate_layout` against the torchrun world size and the checkpoint's
`ModelArchitecture` before building anything; everything below reads the resulting
`LaminaConfig`. The sections' fields *are* the schema: the known keys, their types (`int`,
`float`, `str`, `bool`, `Literal[...]` choices, unions of those), defaults and ranges
(`Field(ge=..., le=..., gt=...)`) all come from them, so a new key is one new field. Pydantic
checks the values (strictly: `true` is not 1, `2.0` is not an integer; an integer is a
number); `_one_line` turns its first error into a `ConfigError` whose message is one line
naming the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megatron_lamina.architecture import ModelArchitecture


class ConfigError(ValueError):
    """A mistake in the config a user can fix; str() is one line starting with 'config: '."""

    def __init__(self, message: str):
        assert "\n" not in message, message
        super().__init__(f"config: {message}")


class _Section(BaseModel):
    # strict: no coercion (true is not 1, "2" is not 2), except an int for a float key;
    # frozen: a config is read, never changed, once checked.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ---------------------------------------------------------------------------------- sections

class ModelConfig(_Section):
    # A canonical checkpoint directory (lamina convert), or a Hugging Face model directory or a
    # GGUF file, converted once at start-up and cached (checkpoint/auto_convert.py). Kept as
    # given here; a relative path is looked for beside the YAML file, then in the working directory.
    checkpoint: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # The model workers' linear weights: null, as the checkpoint holds them; fp8_e4m3, e4m3 with
    # a scale per output channel, quantized at load from a bf16/fp32 checkpoint by the rule
    # `lamina convert --weight-dtype fp8_e4m3` writes (checkpoint/loader.py); bfloat16, the
    # checkpoint's unquantized weights (an FP8 checkpoint is refused).
    weight_dtype: Literal["bfloat16", "fp8_e4m3"] | None = None


class ParallelConfig(_Section):
    tensor_parallel: int = Field(1, ge=1)
    attention_workers: int = Field(0, ge=0)  # 0: attention runs on the model workers (colocated)
    attention_head_groups: int = Field(1, ge=1)  # attention workers form head_groups x request_shards


class RuntimeConfig(_Section):
    device: Literal["cpu", "cuda"] = "cpu"
    transport: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on cuda, gloo on cpu
    # A rank silent this long fails the job (it died or hangs): a wait inside a step (one
    # layer's exchange, the driver's plan to a rank) or a beat of the driver's heartbeat (sent
    # every quarter of it, answered by every rank). It bounds silence, not work: a step, an
    # admission or a stalled front end may last longer (worker/control_plane.py).
    step_timeout_s: float = Field(120.0, gt=0.0, le=86400.0)  # at most a day: .inf and nan are refused
    # CUDA only: replay steps from CUDA graphs, all captured at start-up (colocated decode
    # steps whole; every step's stages between attention calls at token buckets). At
    # tensor_parallel > 1 the TP group must be NCCL (not transport gloo).
    cuda_graphs: bool = True
    # Disaggregated layouts only: each exchange sends q before k, v; the attention worker
    # attends a decode micro-batch's cached tokens while k, v travel, then merges the new
    # token's term exactly by log-sum-exp (the Lamina paper's overlap; issue 16).
    q_first: bool = False


class SchedulerConfig(_Section):
    max_batch_size: int = Field(64, ge=1)  # requests in one step, over all micro-batches
    micro_batches: int = Field(2, ge=1)  # staggered pipelining depth (DESIGN.md section 4); colocated runs 1
    max_prefill_tokens: int = Field(2048, ge=1)  # prompt tokens per step (chunked prefill)
    # Plan step n+1 while step n runs (its tokens fed on the device); false: plan after reading
    # step n back (same tokens, the GPU idles meanwhile).
    async_scheduling: bool = True


class KVCacheConfig(_Section):
    block_size: int = Field(16, ge=1, le=1024)  # tokens per KV block
    # Blocks in each KV cache (one per attention worker; per model worker when colocated);
    # auto: what memory_fraction leaves once the weights, graphs and activations are in place.
    num_blocks: Literal["auto"] | Annotated[int, Field(ge=1, le=2**19)] = "auto"  # 8M tokens at block_size 16
    # Share of the whole device this process may use (vLLM's gpu_memory_utilization; ranks
    # sharing a GPU split it); with num_blocks auto the KV cache gets what is left of it.
    memory_fraction: float = Field(0.9, gt=0.0, le=1.0)
    # Automatic prefix caching (driver/block_manager.py): full blocks computed once are kept,
    # keyed by their prefix, and reused by requests that start the same way; false: every
    # prompt is computed from its first token.
    prefix_caching: bool = True
    # The prefix cache's host tier: GiB of pinned host memory per rank that holds KV, where
    # cached blocks evicted from the device are kept and copied back on a hit; 0: none.
    host_cache_gib: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    # What the cache stores: auto, the model's dtype; fp8_e4m3, float8 e4m3 with a float32
    # scale per layer and KV head (half of bf16's bytes: twice the tokens; attention/kv_cache.py).
    dtype: Literal["auto", "fp8_e4m3"] = "auto"


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_queued_requests: int = Field(1024, ge=1)  # waiting + running beyond this: 503
    drain_timeout_s: float = Field(30.0, ge=0.0, le=86400.0)  # SIGTERM: finish running requests this long
    # A bearer token every route but /health and /metrics requires (null: $LAMINA_API_KEY if set).
    api_key: str | None = None
    cors_origins: list[str] = Field(default_factory=list)  # origins allowed by CORS ("*": any); empty: no CORS
    # The liveness watchdog: no engine progress for this long while requests are pending makes
    # /health answer 503 (and logs a line); the engine's stall, not a slow client.
    stall_timeout_s: float = Field(60.0, gt=0.0, le=86400.0)
    # The largest request body (a chunked one too: reading stops once past it; a 413 beyond it),
    # and the largest line of a batch job's input. Bounds what one request can make the front end hold.
    max_body_mb: int = Field(32, ge=1, le=4096)
    # A connection must have sent a request's headers this long after it opened (or after its
    # last answer): slow-header clients (slowloris) are closed instead of held open forever.
    header_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    # Structured outputs (requests/grammar.py): compiled grammars kept per process, keyed by their
    # text; the longest schema, regex or grammar a request may send; how long the front end waits
    # for a new one's compile before answering 400 (a hostile schema cannot hold it longer).
    grammar_cache_size: int = Field(256, ge=1)
    max_grammar_chars: int = Field(65536, ge=1)
    grammar_compile_timeout_s: float = Field(10.0, gt=0.0, le=600.0)
    # How tool calls are read from the output (server/tool_parsers.py): hermes (<tool_call>{json}
    # </tool_call>, Qwen2.5 and Hermes), llama3_json ({"name", "parameters"}, LLaMA-3.1/3.2), or
    # auto: from the chat template (hermes when the template names neither).
    tool_call_parser: Literal["auto", "hermes", "llama3_json"] = "auto"


class NodeConfig(_Section):
    """One machine of a deployment: the role its ranks take and how many it runs."""

    role: Literal["model", "attention"]
    workers: int = Field(ge=1)


class DeploymentConfig(_Section):
    # One entry per machine, in node-rank order (`--node-rank R` is nodes[R]). Node 0 is the
    # model node: its `workers` are the tensor-parallel ranks (TP stays inside one machine),
    # and it runs the engine loop and the HTTP front end. Every other node is an attention
    # node; the attention workers are numbered across them in node order. Empty: one machine.
    nodes: list[NodeConfig] = Field(default_factory=list)


def micro_batches_run(attention_workers: int, asked: int) -> int:
    """Micro-batches a step is split into: scheduler.micro_batches, or 1 when colocated, where
    micro-batches overlap nothing (no exchange to hide) and only a one-micro-batch step is
    replayed as one whole-step CUDA graph (vLLM's rule: the fastest path by default)."""
    return asked if attention_workers else 1


def request_shards(attention_workers: int, head_groups: int) -> int:
    """Independent KV pools a request can be placed on: attention workers form a grid of
    head groups x request shards; colocated (no attention workers) there is one."""
    return attention_workers // head_groups if attention_workers else 1


class LaminaConfig(_Section):
    """The whole run configuration. `load_config` / `from_dict` check every value and give
    one-line errors; `LaminaConfig(...)` checks too but raises pydantic's ValidationError."""

    model: ModelConfig
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)

    @property
    def world_size(self) -> int:
        """Ranks the torchrun job must have: the model workers, then the attention workers."""
        return self.parallel.tensor_parallel + self.parallel.attention_workers

    @property
    def colocated(self) -> bool:
        return self.parallel.attention_workers == 0

    @property
    def process_group_backend(self) -> str:
        """torch.distributed's backend: gloo on CPU (or transport gloo), NCCL for CUDA tensors."""
        return "gloo" if self.runtime.device == "cpu" or self.runtime.transport == "gloo" else "cpu:gloo,cuda:nccl"

    @property
    def micro_batches(self) -> int:
        """Micro-batches a step is split into (`micro_batches_run`)."""
        return micro_batches_run(self.parallel.attention_workers, self.scheduler.micro_batches)

    @property
    def request_shards(self) -> int:
        """Independent KV pools a request can be placed on (1 when colocated)."""
        return request_shards(self.parallel.attention_workers, self.parallel.attention_head_groups)

    @property
    def torch_dtype(self):
        import torch  # here, so that reading a config does not pay for importing torch

        return getattr(torch, self.model.dtype)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return self.model_dump()

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
        # A missing section, or one with every key commented out (`scheduler:`), is all defaults.
        sections = {name: {} if data.get(name) is None else data[name] for name in _SECTIONS}
        try:
            cfg = cls.model_validate(sections)
        except ValidationError as e:
            raise ConfigError(_one_line(e)) from None
        _check_host_tier(cfg.kv_cache)
        return _with_deployment(cfg)

    @property
    def nnodes(self) -> int:
        """Machines the job runs on (1 without a deployment section)."""
        return max(1, len(self.deployment.nodes))

    def node_workers(self, node_rank: int) -> int:
        """Ranks that machine `node_rank` runs (the whole job on one machine)."""
        return self.deployment.nodes[node_rank].workers if self.deployment.nodes else self.world_size


_SECTIONS: dict[str, type[_Section]] = {name: f.annotation for name, f in LaminaConfig.model_fields.items()}


def _check_host_tier(kv: KVCacheConfig) -> None:
    """The host tier keeps the prefix cache's blocks evicted from the device: asked for with
    the cache off it would hold nothing, so it is refused rather than silently left out."""
    if kv.host_cache_gib > 0 and not kv.prefix_caching:
        raise ConfigError(f"kv_cache.host_cache_gib = {kv.host_cache_gib:g} needs kv_cache.prefix_caching: true "
                          f"(the host tier keeps the prefix cache's evicted blocks); set one of them "
                          f"(kv_cache.host_cache_gib: 0 for no tier)")


def _with_deployment(cfg: LaminaConfig) -> LaminaConfig:
    """A config's `deployment.nodes` checked, and the parallel sizes they imply filled in:
    parallel.tensor_parallel is the model node's workers, parallel.attention_workers the
    attention nodes' together. Either may be written out too, but then it must agree."""
    nodes = cfg.deployment.nodes
    if not nodes:
        return cfg
    models = [i for i, node in enumerate(nodes) if node.role == "model"]
    if len(models) != 1:
        listed = ", ".join(f"nodes[{i}]" for i in models) or "none"
        raise ConfigError(
            f"deployment.nodes: {len(models)} nodes have role model ({listed}); tensor parallelism "
            f"stays inside one machine, so a deployment has exactly one model node, with "
            f"workers = parallel.tensor_parallel")
    if models[0] != 0:
        raise ConfigError(
            f"deployment.nodes[0].role = 'attention': node rank 0 runs the engine and the HTTP "
            f"server, so nodes[0] must be the model node (it is nodes[{models[0]}])")
    implied = {"tensor_parallel": nodes[0].workers,
               "attention_workers": sum(node.workers for node in nodes[1:])}
    par = cfg.parallel
    for key, value in implied.items():
        if key in par.model_fields_set and getattr(par, key) != value:
            what = ("the model node's workers (deployment.nodes[0].workers)" if key == "tensor_parallel"
                    else "the attention nodes' workers together")
            raise ConfigError(
                f"parallel.{key} = {getattr(par, key)}: deployment.nodes gives {value}, {what}; "
                f"remove parallel.{key} or make the two agree")
    return cfg.model_copy(update={"parallel": par.model_copy(update=implied)})


# -------------------------------------------------------------------------------- messages

def _one_line(error: ValidationError) -> str:
    """The first of pydantic's errors, in the order a reader checks a file (a section that is
    no mapping, an unknown key, then the keys in order), as one line naming the dotted key,
    the value and what the key accepts."""
    errors = error.errors()
    first = min(range(len(errors)), key=lambda i: (
        list(_SECTIONS).index(errors[i]["loc"][0]),
        errors[i]["type"] not in ("model_type", "extra_forbidden", "invalid_key"), i))
    e = errors[first]
    section, section_cls = e["loc"][0], _SECTIONS[e["loc"][0]]
    known = ", ".join(section_cls.model_fields)
    listed = section_cls.model_fields.get(e["loc"][1]) if len(e["loc"]) > 1 else None
    if listed is not None and _is_section_list(listed.annotation):  # deployment.nodes[i].role
        return _nested(f"{section}.{e['loc'][1]}", e, listed.annotation)
    if e["type"] == "model_type":
        return f"{section} = {e['input']!r}: expected a mapping of keys ({known})"
    key = e["loc"][1]
    dotted = f"{section}.{key}"
    if e["type"] in ("extra_forbidden", "invalid_key"):
        return f"unknown key {dotted!r} (known keys in {section}: {known})"
    if e["type"] == "missing":
        return f"{dotted} is required: set it in the config file or with --set {dotted}=VALUE"
    field = section_cls.model_fields[key]
    value = e["input"]
    if typing.get_origin(field.annotation) in (typing.Union, types.UnionType):
        return f"{dotted} = {value!r}: must be {' or '.join(_allowed(a) for a in typing.get_args(field.annotation))}"
    if typing.get_origin(field.annotation) is Literal:
        return f"{dotted} = {value!r}: allowed values are {', '.join(map(str, typing.get_args(field.annotation)))}"
    if e["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{dotted} = {value!r}: must be {_allowed(field.annotation, field.metadata)}"
    if e["type"] == "finite_number":  # allow_inf_nan=False
        return f"{dotted} = {value!r}: must be a finite {_allowed(field.annotation, field.metadata).removeprefix('a ')}"
    return f"{dotted} = {value!r}: expected {_allowed(field.annotation)}"


def _is_section_list(annotation: Any) -> bool:
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) is list and isinstance(args[0], type) and issubclass(args[0], _Section)


def _nested(dotted: str, e: dict, annotation: Any) -> str:
    """An error inside a list of sections, e.g. deployment.nodes[1].workers = 0."""
    where, item_cls = dotted, typing.get_args(annotation)[0]
    for part in e["loc"][2:]:
        where += f"[{part}]" if isinstance(part, int) else f".{part}"
    field_name = e["loc"][-1]
    if e["type"] in ("model_type", "model_attributes_type"):
        return f"{where} = {e['input']!r}: expected a mapping with keys {', '.join(item_cls.model_fields)}"
    if e["type"] in ("extra_forbidden", "invalid_key"):
        return f"unknown key {where!r} (known keys: {', '.join(item_cls.model_fields)})"
    if e["type"] == "list_type":
        return f"{where} = {e['input']!r}: expected a list"
    if e["type"] == "missing":
        return f"{where} is required"
    field = item_cls.model_fields.get(field_name)
    if field is None:
        return f"{where} = {e['input']!r}: {e['msg']}"
    if typing.get_origin(field.annotation) is Literal:
        return f"{where} = {e['input']!r}: allowed values are {', '.join(map(str, typing.get_args(field.annotation)))}"
    return f"{where} = {e['input']!r}: must be {_allowed(field.annotation, field.metadata)}"


def _allowed(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """'an integer >= 1', 'a number in (0, 1]', "'auto'", 'true or false', ... of a field's
    type and its range (`metadata`: annotated_types bounds, or found inside `Annotated`)."""
    if typing.get_origin(annotation) is Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata = [*metadata, *(m for field in extra for m in field.metadata)]
    if typing.get_origin(annotation) is Literal:
        return " or ".join(repr(c) for c in typing.get_args(annotation))
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a string"
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is list:
        return f"a list of {_allowed(typing.get_args(annotation)[0]).removeprefix('a ')}s"
    noun = "an integer" if annotation is int else "a number"
    lo = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
    hi = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
    above = next((m.gt for m in metadata if isinstance(m, annotated_types.Gt)), None)
    if above is not None and hi is not None:
        return f"{noun} in ({above:g}, {hi:g}]"
    if lo is not None and hi is not None:
        return f"{noun} in {lo:g}..{hi:g}" if annotation is int else f"{noun} in [{lo:g}, {hi:g}]"
    if above is not None:
        return f"{noun} > {above:g}"
    if lo is not None:
        return f"{noun} >= {lo:g}"
    return noun


# ---------------------------------------------------------------------------------- loading

def load_config(path: str | Path | None, overrides: Sequence[str] = (),
                values: dict[str, Any] | None = None) -> LaminaConfig:
    """Read the YAML file at `path` (None: start from the defaults), set `values` ({"section.key":
    value}, the launchers' flags), apply the `--set` overrides in order ("section.key=value",
    the value parsed as YAML) and check the result."""
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
    for key, value in (values or {}).items():
        section, name = key.split(".")
        if isinstance(data.get(section), dict) or data.get(section) is None:  # else from_dict names the section
            data[section] = {**(data.get(section) or {}), name: value}
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
    if name not in _SECTIONS[section].model_fields:
        raise ConfigError(f"unknown key '{key}' (known keys in {section}: "
                          f"{', '.join(_SECTIONS[section].model_fields)})")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {override!r}: the value is not valid YAML{_yaml_where(e)}") from None
    if data.get(section) is None:
        data[section] = {}
    if not isinstance(data[section], dict):
        raise ConfigError(f"{section} = {data[section]!r}: expected a mapping of keys "
                          f"({', '.join(_SECTIONS[section].model_fields)})")
    data[section][name] = value


# Ordinary flags for the common keys: each is the same as `--set KEY=VALUE` of its key.
FLAGS: dict[str, tuple[str, type]] = {
    "--host": ("server.host", str),
    "--port": ("server.port", int),
    "--api-key": ("server.api_key", str),
    "--tensor-parallel": ("parallel.tensor_parallel", int),
    "--attention-workers": ("parallel.attention_workers", int),
    "--max-batch-size": ("scheduler.max_batch_size", int),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The launchers' config options: an optional positional MODEL (model.checkpoint),
    `--config PATH`, repeatable `--set KEY=VALUE`, the `FLAGS`, and an epilog listing every
    key with its default."""
    parser.add_argument("model", nargs="?", metavar="MODEL", default=None,
                        help="model.checkpoint: a megatron-lamina checkpoint directory, a Hugging Face model "
                             "directory or a GGUF file (the last two converted once and cached)")
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="YAML config (see configs/); without it every key has its default "
                             "and model.checkpoint must come from MODEL or --set")
    parser.add_argument("--set", dest="config_overrides", metavar="KEY=VALUE", action="append",
                        default=[], help="override one config key, e.g. --set scheduler.micro_batches=4; "
                                         "repeatable, applied in order after the file")
    for flag, (key, kind) in FLAGS.items():
        parser.add_argument(flag, dest=_flag_dest(flag), type=kind, metavar=key.split(".")[1].upper(),
                            default=None, help=f"the same as --set {key}=VALUE")
    parser.epilog = "\n".join(filter(None, [parser.epilog, config_keys_help()]))


def _flag_dest(flag: str) -> str:
    return "flag_" + flag.removeprefix("--").replace("-", "_")


def config_keys_help() -> str:
    """Every config key with its default and what it accepts (for --help)."""
    lines = ["config keys (--set KEY=VALUE, or in the --config file), with their defaults:"]
    for section, cls in _SECTIONS.items():
        for name, field in cls.model_fields.items():
            default = "required" if field.is_required() else json.dumps(field.get_default(call_default_factory=True))
            if _is_section_list(field.annotation):
                allowed = f"a list of mappings with keys {', '.join(typing.get_args(field.annotation)[0].model_fields)}"
            elif typing.get_origin(field.annotation) in (typing.Union, types.UnionType):
                allowed = " or ".join(_allowed(a) for a in typing.get_args(field.annotation))
            else:
                allowed = _allowed(field.annotation, field.metadata)
            lines.append(f"  {section}.{name} = {default}  ({allowed})")
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> LaminaConfig:
    """The config of parsed launcher arguments: the file, then MODEL and the FLAGS, then --set."""
    given: list[tuple[str, Any]] = []
    if getattr(args, "model", None) is not None:
        given.append(("model.checkpoint", args.model))
    given += [(key, getattr(args, _flag_dest(flag), None)) for flag, (key, _) in FLAGS.items()]
    return load_config(args.config, args.config_overrides,
                       values={key: value for key, value in given if value is not None})


# ----------------------------------------------------------------------------------- layout

def check_device(cfg: LaminaConfig) -> None:
    """runtime.device must be one this torch can use: ConfigError (one line) for cuda on a
    torch built without CUDA or on a machine where it sees no GPU."""
    if cfg.runtime.device != "cuda":
        return
    import torch

    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is built without CUDA"
    elif not torch.cuda.is_available():
        why = f"this torch ({torch.__version__}) sees no CUDA device"
    else:
        return
    raise ConfigError(f"runtime.device = 'cuda': {why}; use --set runtime.device=cpu, or install a CUDA torch "
                      "(TORCH_SPEC=torch bash tools/setup.sh)")


def validate_layout(cfg: LaminaConfig, world_size: int, arch: ModelArchitecture) -> None:
    """Check that the config fits the torchrun job (`world_size` ranks) and the model's KV
    heads; called on every rank before any process group or model is built."""
    par = cfg.parallel
    if world_size != cfg.world_size:
        raise ConfigError(
            f"parallel.tensor_parallel ({par.tensor_parallel}) + parallel.attention_workers "
            f"({par.attention_workers}) = {cfg.world_size} but the job has {world_size} ranks; "
            f"start torchrun with --nproc-per-node {cfg.world_size} or change the config")
    check_layout(par, cfg.scheduler, arch.num_kv_heads)
    if cfg.runtime.transport == "nccl" and cfg.runtime.device == "cpu":
        raise ConfigError(
            "runtime.transport = 'nccl': needs runtime.device = 'cuda'; with device cpu "
            "the allowed values are auto, gloo")


def check_layout(par: ParallelConfig, sched: SchedulerConfig, kv_heads: int) -> None:
    """The layout rules of a model with `kv_heads` KV heads: how the ranks split them and how
    many micro-batches the batch cap allows. One rule for the engine (`validate_layout`) and
    the planner (planner/layout.Layout.check), so that neither proposes what the other refuses;
    a ConfigError names the key and its allowed values."""
    divisors = ", ".join(str(d) for d in range(1, kv_heads + 1) if kv_heads % d == 0)
    if kv_heads % par.tensor_parallel:
        raise ConfigError(
            f"parallel.tensor_parallel = {par.tensor_parallel}: must divide the model's "
            f"{kv_heads} KV heads; allowed values are {divisors}")
    if kv_heads % par.attention_head_groups:
        raise ConfigError(
            f"parallel.attention_head_groups = {par.attention_head_groups}: must divide the "
            f"model's {kv_heads} KV heads; allowed values are {divisors}")
    if par.attention_workers == 0 and par.attention_head_groups > 1:
        raise ConfigError(
            f"parallel.attention_head_groups = {par.attention_head_groups}: must be 1 when "
            f"parallel.attention_workers = 0 (colocated: there are no attention workers to group)")
    if par.attention_workers % par.attention_head_groups:
        g = par.attention_head_groups
        raise ConfigError(
            f"parallel.attention_workers = {par.attention_workers}: must be a multiple of "
            f"parallel.attention_head_groups ({g}), one worker per head group and request "
            f"shard; allowed values are {g}, {2 * g}, {3 * g}, ...")
    if sched.micro_batches > sched.max_batch_size:
        raise ConfigError(
            f"scheduler.micro_batches = {sched.micro_batches}: must be <= "
            f"scheduler.max_batch_size ({sched.max_batch_size}), every micro-batch "
            f"needs at least one request")
