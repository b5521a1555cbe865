"""Start-up of one rank: the process groups, the worker, the start-up log.

Every launcher calls `start_rank(cfg)` under torchrun (or `lamina`, which starts torchrun's ranks). It joins the job, validates the layout
against the checkpoint (one clear line on a mismatch), creates the process groups
(topology.py) and asks the worker factory (worker_factory.py) for this rank's worker, printing
a line per start-up phase on the driver. Rank 0 then drives an `LLMEngine`; every other rank
runs `control_plane.serve_plans` until the driver's shutdown plan.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_lamina.architecture import ModelArchitecture, read_architecture
from megatron_lamina.config import LaminaConfig, validate_layout
from megatron_lamina.engine.attention_worker import AttentionWorker
from megatron_lamina.engine.model_worker import ModelWorker
from megatron_lamina.engine.worker_factory import build_worker
from megatron_lamina.topology import ProcessGroups, Topology, init_process_groups


@dataclass
class RankContext:
    cfg: LaminaConfig
    arch: ModelArchitecture
    topology: Topology
    groups: ProcessGroups
    rank: int
    device: torch.device
    num_blocks: int
    worker: ModelWorker | AttentionWorker


class StartupLog:
    """The driver's start-up lines, with the seconds since the rank started (stderr)."""

    def __init__(self, rank: int):
        self.rank, self.started = rank, time.monotonic()

    def __call__(self, message: str) -> None:
        if self.rank == 0:
            print(f"[lamina {time.monotonic() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)


def start_from_args(args) -> RankContext | None:
    """Launchers: the config from --config/--set, then `start_rank`. A user's mistake (config,
    layout, missing checkpoint) is printed by the driver as one `error:` line and None is
    returned; the launcher exits 2."""
    from megatron_lamina.checkpoint.errors import CheckpointInputError
    from megatron_lamina.config import ConfigError, config_from_args

    try:
        return start_rank(config_from_args(args))
    except (ConfigError, CheckpointInputError, FileNotFoundError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return None


def init_distributed(cfg: LaminaConfig) -> None:
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        raise RuntimeError("a rank runs under a launcher: start the job with `lamina serve|generate --config ...` "
                           f"(or torchrun --nproc-per-node {cfg.world_size} launcher/serve.py|generate.py ...)")
    backend = "gloo" if cfg.runtime.device == "cpu" or cfg.runtime.transport == "gloo" else "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.runtime.step_timeout_s))


def start_rank(cfg: LaminaConfig) -> RankContext:
    init_distributed(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    log = StartupLog(rank)
    arch = read_architecture(cfg.model.checkpoint)
    validate_layout(cfg, world, arch)
    log(f"checkpoint {cfg.model.checkpoint}: {arch.num_layers} layers, hidden {arch.hidden_size}, "
        f"{arch.num_attention_heads}/{arch.num_kv_heads} heads; {world} ranks "
        f"(TP {cfg.parallel.tensor_parallel}, {cfg.parallel.attention_workers} attention workers)")
    topology = Topology.from_config(cfg, arch.num_kv_heads)
    groups = init_process_groups(topology, rank, cfg.runtime.step_timeout_s)
    device = _device(cfg)
    built = build_worker(cfg, arch, topology, groups, rank, device, log)
    dist.barrier(group=groups.startup)  # every rank is ready before the driver takes requests
    log("every rank is ready")
    return RankContext(cfg, arch, topology, groups, rank, device, built.num_blocks, built.worker)


def _device(cfg: LaminaConfig) -> torch.device:
    if cfg.runtime.device == "cpu":
        return torch.device("cpu")
    # Ranks beyond the GPU count share devices (e.g. a disaggregated smoke test on one GPU).
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
