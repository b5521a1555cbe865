"""Start-up of one rank: process groups, its role's objects, and the plan loop of non-drivers.

Every launcher calls `start_rank(cfg)` under torchrun. It validates the layout against the
checkpoint (one clear line on a mismatch), creates the process groups (topology.py), agrees
on the KV-cache size across ranks, and builds what this rank's role needs:
  * model workers: `LlamaModel` with its TP shard of the weights, bound to a `P2PChannel`
    (disaggregated) or to a `LocalChannel` over a local paged cache (colocated), and, with
    `runtime.cuda_graphs` on CUDA (at TP > 1 with NCCL), its decode graphs (`DecodeGraphs`
    colocated, `StageGraphs` disaggregated);
  * attention workers: a `PagedKVCache` and an `AttentionEndpoint`.
Rank 0 gets an `LLMEngine` to drive; every other rank runs `serve_plans` until the driver
broadcasts the shutdown plan.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist

from megatron_lamina.architecture import ModelArchitecture, read_architecture
from megatron_lamina.attention.kv_cache import PagedKVCache
from megatron_lamina.attention.reference import attend_chunks
from megatron_lamina.checkpoint.loader import CheckpointShardLoader
from megatron_lamina.config import LaminaConfig, validate_layout
from megatron_lamina.engine.attention_runner import AttentionRunner
from megatron_lamina.engine.model_runner import ModelRunner
from megatron_lamina.model.llama import LlamaModel
from megatron_lamina.plan import StepPlan
from megatron_lamina.topology import ProcessGroups, Topology, init_process_groups
from megatron_lamina.transport.channel import LocalChannel
from megatron_lamina.transport.p2p import AttentionEndpoint, P2PChannel


@dataclass
class RankContext:
    cfg: LaminaConfig
    arch: ModelArchitecture
    topology: Topology
    groups: ProcessGroups
    rank: int
    device: torch.device
    num_blocks: int
    runner: ModelRunner | AttentionRunner


def start_from_args(args) -> RankContext | None:
    """Launchers: the config from --config/--set, then `start_rank`. A user's mistake (config,
    layout, missing checkpoint) is printed by the driver as one `error:` line and None is
    returned; the launcher exits 2."""
    from megatron_lamina.config import ConfigError, config_from_args

    try:
        return start_rank(config_from_args(args))
    except (ConfigError, FileNotFoundError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return None


def init_distributed(cfg: LaminaConfig) -> None:
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        raise RuntimeError("start the job with torchrun (e.g. torchrun --nproc-per-node "
                           f"{cfg.world_size} launcher/generate.py --config ...)")
    backend = "gloo" if cfg.runtime.device == "cpu" or cfg.runtime.transport == "gloo" else "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.runtime.step_timeout_s))


def start_rank(cfg: LaminaConfig) -> RankContext:
    init_distributed(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    arch = read_architecture(cfg.model.checkpoint)
    validate_layout(cfg, world, arch)
    topology = Topology.from_config(cfg, arch.num_kv_heads)
    groups = init_process_groups(topology, rank, cfg.runtime.step_timeout_s)
    device = _device(cfg)
    dtype = cfg.torch_dtype
    holds_cache = topology.colocated or not topology.is_model_worker(rank)
    kv_heads = arch.num_kv_heads // (topology.tp_size if topology.colocated or topology.is_model_worker(rank)
                                     else topology.head_groups)
    num_blocks = _agree_num_blocks(cfg, arch, groups, holds_cache, kv_heads, device)
    # CUDA graphs on a GPU. Colocated: whole decode steps (DecodeGraphs); disaggregated: the
    # model worker's stages between attention calls (StageGraphs). At TP > 1 the graphs hold
    # the TP all-reduces, so the TP group must reduce CUDA tensors through NCCL (a gloo
    # collective stages through the host and cannot be captured): eager otherwise.
    use_graphs = (cfg.runtime.cuda_graphs and device.type == "cuda"
                  and (topology.tp_size == 1 or dist.get_backend() != "gloo"))
    decode_graphs = use_graphs and topology.colocated
    # With decode graphs the cache has one more block, never handed out: padding rows' scratch.
    cache = PagedKVCache(arch.num_layers, num_blocks + decode_graphs, cfg.kv_cache.block_size, kv_heads,
                         arch.head_dim, dtype, device) if holds_cache else None

    attend = _attention_kernel(cache, device) if holds_cache else None
    host_staging = device.type == "cuda" and dist.get_backend() == "gloo"
    if topology.is_model_worker(rank):
        kv_lo, _ = topology.tp_kv_range(rank)
        if topology.colocated:
            channel = LocalChannel(attend)
        else:
            channel = P2PChannel(topology.routes_from_tp(rank), kv_lo, arch.queries_per_kv_head, host_staging,
                                 groups.to_attention, groups.to_model)
        loader = CheckpointShardLoader(cfg.model.checkpoint, rank, topology.tp_size, dtype)
        model = LlamaModel(arch, dtype, groups.tp, channel, loader.padded_vocab_size)
        loader.load_into(model)
        model = model.to(device)
        graphs = None
        if decode_graphs:
            from megatron_lamina.engine.cuda_graphs import DecodeGraphs

            max_blocks = -(-arch.max_position_embeddings // cfg.kv_cache.block_size)
            graphs = DecodeGraphs(model, attend, cfg.scheduler.max_batch_size, max_blocks, scratch_block=num_blocks)
        elif use_graphs:
            from megatron_lamina.engine.stage_graphs import StageGraphs

            graphs = StageGraphs(model, cfg.scheduler.max_batch_size, cfg.scheduler.micro_batches)
        runner = ModelRunner(model, graphs)
    else:
        group, shard = topology.attention_coords(rank)
        kv_lo, _ = topology.group_kv_range(group)
        endpoint = AttentionEndpoint(topology.routes_to_attention(rank), shard, kv_lo, kv_heads,
                                     arch.queries_per_kv_head, arch.head_dim, dtype, device, host_staging,
                                     groups.to_attention, groups.to_model)
        runner = AttentionRunner(endpoint, attend, arch.num_layers)
    return RankContext(cfg, arch, topology, groups, rank, device, num_blocks, runner)


def _attention_kernel(cache: PagedKVCache, device: torch.device):
    """The torch reference on CPU; the Triton decode kernel + SDPA prefill on CUDA."""
    if device.type == "cuda":
        from megatron_lamina.attention.gpu import PagedAttention

        return PagedAttention(cache)
    return partial(attend_chunks, cache)


def _device(cfg: LaminaConfig) -> torch.device:
    if cfg.runtime.device == "cpu":
        return torch.device("cpu")
    # Ranks beyond the GPU count share devices (e.g. a disaggregated smoke test on one GPU).
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _agree_num_blocks(cfg, arch, groups, holds_cache, kv_heads, device) -> int:
    """Every cache gets the same block count: the configured one, or the smallest that fits."""
    if cfg.kv_cache.num_blocks != "auto":
        return cfg.kv_cache.num_blocks
    capacity = torch.tensor([2**62], dtype=torch.long)
    if holds_cache:
        per_block = PagedKVCache.bytes_per_block(arch.num_layers, cfg.kv_cache.block_size, kv_heads,
                                                 arch.head_dim, cfg.torch_dtype)
        capacity[0] = int(_free_bytes(device) * cfg.kv_cache.memory_fraction) // per_block
    dist.all_reduce(capacity, op=dist.ReduceOp.MIN, group=groups.control)
    if capacity.item() < 1:
        raise RuntimeError("kv_cache.num_blocks = auto found no memory for even one KV block; "
                           "lower the model size or set kv_cache.num_blocks")
    return int(capacity.item())


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // sharing


def broadcast_plan(plan: StepPlan | None, groups: ProcessGroups) -> StepPlan:
    if groups.control.size() == 1:  # a lone colocated rank: nobody to tell (and no pickling)
        return plan
    box = [plan]
    dist.broadcast_object_list(box, src=0, group=groups.control)
    return box[0]


def serve_plans(ctx: RankContext) -> None:
    """Non-driver ranks: execute every plan the driver broadcasts, until shutdown."""
    while True:
        plan = broadcast_plan(None, ctx.groups)
        if plan.shutdown:
            return
        ctx.runner.run(plan)
