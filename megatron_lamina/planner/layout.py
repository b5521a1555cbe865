"""One candidate layout: which devices do what, what it costs, how much KV it holds, and the
config YAML that runs it (megatron_lamina/config.py's format).

KV capacity follows the engine (runtime.py): every KV cache (one per attention worker; one
per TP rank when colocated) gets the same number of blocks; a block holds `block_size`
tokens of every layer for the cache's KV heads (kv_heads / head_groups on an attention
worker, kv_heads / TP colocated), at the layout's `kv_cache_dtype` (fp8_e4m3: one byte per
element, twice the tokens of bf16). The memory a cache may use is ASSUMED to be
`MEMORY_FRACTION` of the device (the config's default) minus the weights (model workers)
and a workspace for activations, logits and the CUDA context (`*_WORKSPACE_BYTES`); the
engine's `num_blocks: auto` measures what is really free at start-up instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import yaml

from megatron_lamina.config import LaminaConfig, ParallelConfig, SchedulerConfig, check_layout, request_shards
from megatron_lamina.fp8 import FP8, FP8_NAME
from megatron_lamina.planner.devices import DeviceSpec
from megatron_lamina.planner.shapes import ModelShape

MEMORY_FRACTION = 0.9
MODEL_WORKSPACE_BYTES = 4e9      # ASSUMPTION: activations of a large step, logits, CUDA context
ATTENTION_WORKSPACE_BYTES = 1e9  # ASSUMPTION: q/k/v/o buffers, CUDA context


@dataclass(frozen=True)
class Layout:
    model_device: str
    tp: int                          # model workers (tensor-parallel ranks), one replica
    attention_device: str | None     # None: colocated
    attention_workers: int           # 0: colocated
    head_groups: int                 # attention workers = head_groups x request shards
    micro_batches: int
    max_batch_size: int
    max_prefill_tokens: int = 4096
    block_size: int = 16
    kv_cache_dtype: str = "auto"     # the config's kv_cache.dtype: auto (the model's) or fp8_e4m3

    def kv_dtype_bytes(self, dtype_bytes: int) -> int:
        """Bytes of one cached k or v element, for a model of `dtype_bytes`."""
        return FP8.itemsize if self.kv_cache_dtype == FP8_NAME else dtype_bytes

    @property
    def colocated(self) -> bool:
        return self.attention_workers == 0

    @property
    def request_shards(self) -> int:
        return request_shards(self.attention_workers, self.head_groups)

    @property
    def num_devices(self) -> int:
        return self.tp + self.attention_workers

    @property
    def ratio(self) -> float:
        """Attention workers per model worker (0 colocated)."""
        return self.attention_workers / self.tp

    def devices(self) -> dict[str, int]:
        count = {self.model_device: self.tp}
        if not self.colocated:
            count[self.attention_device] = count.get(self.attention_device, 0) + self.attention_workers
        return count

    def price_per_hour(self, specs: dict[str, DeviceSpec]) -> float:
        return sum(specs[name].price_per_hour * n for name, n in self.devices().items())

    @property
    def hardware(self) -> str:
        """'2xH100' or '1xH100 + 2xH20': the devices, without the scheduler knobs."""
        model = f"{self.tp}x{self.model_device}"
        return model if self.colocated else f"{model} + {self.attention_workers}x{self.attention_device}"

    @property
    def label(self) -> str:
        groups = "" if self.colocated else f" g{self.head_groups}"
        kv = " fp8kv" if self.kv_cache_dtype == FP8_NAME else ""
        return f"{self.hardware} TP{self.tp}{groups} n{self.micro_batches} b{self.max_batch_size}{kv}"

    def with_batch(self, max_batch_size: int) -> "Layout":
        return replace(self, max_batch_size=max_batch_size)

    def check(self, shape: ModelShape) -> None:
        """The engine's layout rules (config.check_layout): a ConfigError (a ValueError) naming
        the config key this layout would set and its allowed values."""
        check_layout(ParallelConfig(**self.parallel_section()), SchedulerConfig(**self.scheduler_section()),
                     shape.num_kv_heads)

    def parallel_section(self) -> dict:
        """The config's `parallel` keys of this layout."""
        return {"tensor_parallel": self.tp, "attention_workers": self.attention_workers,
                "attention_head_groups": self.head_groups}

    def scheduler_section(self) -> dict:
        """The config's `scheduler` keys of this layout."""
        return {"max_batch_size": self.max_batch_size, "micro_batches": self.micro_batches,
                "max_prefill_tokens": self.max_prefill_tokens}

    def to_dict(self) -> dict:
        return {"model_device": self.model_device, "tp": self.tp, "attention_device": self.attention_device,
                "attention_workers": self.attention_workers, "head_groups": self.head_groups,
                "micro_batches": self.micro_batches, "max_batch_size": self.max_batch_size,
                "max_prefill_tokens": self.max_prefill_tokens, "block_size": self.block_size,
                "kv_cache_dtype": self.kv_cache_dtype}


def kv_blocks_per_cache(layout: Layout, shape: ModelShape, specs: dict[str, DeviceSpec],
                        dtype_bytes: int) -> int:
    """Blocks of one KV cache (one request shard's pool); 0 when the weights do not fit."""
    model = specs[layout.model_device]
    model_free = (model.memory_bytes * MEMORY_FRACTION - shape.weight_bytes(dtype_bytes) / layout.tp
                  - MODEL_WORKSPACE_BYTES)
    if model_free <= 0:
        return 0
    token_bytes = shape.kv_bytes_per_token(layout.kv_dtype_bytes(dtype_bytes))
    if layout.colocated:
        per_block = layout.block_size * token_bytes / layout.tp
        return int(model_free // per_block)
    attention = specs[layout.attention_device]
    per_block = layout.block_size * token_bytes / layout.head_groups
    return max(0, int((attention.memory_bytes * MEMORY_FRACTION - ATTENTION_WORKSPACE_BYTES) // per_block))


def host_blocks_per_cache(layout: Layout, shape: ModelShape, host_cache_gib: float, dtype_bytes: int) -> int:
    """The prefix cache's host-tier slots of one KV cache (kv_cache.host_cache_gib on each rank
    that holds KV: a block there holds its cache's share of the KV heads)."""
    per_block = layout.block_size * shape.kv_bytes_per_token(layout.kv_dtype_bytes(dtype_bytes)) / (
        layout.tp if layout.colocated else layout.head_groups)
    return int(host_cache_gib * (1 << 30) // per_block)


def config_yaml(layout: Layout, checkpoint: str, dtype: str, header: list[str],
                nodes: list[dict] | None = None, kv_cache: dict | None = None) -> str:
    """The run config of `layout` (checked by LaminaConfig.from_dict), with `header` as comments;
    `nodes`: its `deployment.nodes` when it runs on several machines (deployment.py);
    `kv_cache`: more keys of its kv_cache section (the prefix cache's host tier)."""
    data = {
        "model": {"checkpoint": checkpoint, "dtype": dtype},
        "parallel": layout.parallel_section(),
        "runtime": {"device": "cuda", "transport": "auto"},
        "scheduler": layout.scheduler_section(),
        "kv_cache": {"block_size": layout.block_size, "num_blocks": "auto",
                     "memory_fraction": MEMORY_FRACTION, "dtype": layout.kv_cache_dtype, **(kv_cache or {})},
    }
    if nodes:
        data["deployment"] = {"nodes": nodes}
    LaminaConfig.from_dict(data)
    body = yaml.safe_dump(data, sort_keys=False)
    return "".join(f"# {line}\n" if line else "#\n" for line in header) + "\n" + body
