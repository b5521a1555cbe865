"""Start-up of one rank: the process groups, the worker, the start-up log.

Every launcher first reads its job (`job_from_args`: the config and this machine's node rank)
and joins it (`join`: the placed ranks of placement.py, so roles follow the machines, not their
join order), then
calls `start_rank(cfg, placement)`, which validates the layout
against the checkpoint (one clear line on a mismatch), creates the process groups
(topology.py) and asks the worker factory (worker_factory.py) for this rank's worker, printing
a line per start-up phase on the driver. Once every rank is ready it starts the liveness
signal (control_plane.py: the driver's heartbeat, every other rank's watchdog). Rank 0 then
drives an `LLMEngine`; every other rank runs `control_plane.serve_plans` until the driver's
shutdown plan.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_lamina.architecture import ModelArchitecture, read_architecture
from megatron_lamina.config import LaminaConfig, validate_layout
from megatron_lamina.worker.collector import collect_rarely
from megatron_lamina.worker.control_plane import Heartbeat, Watchdog, start_liveness
from megatron_lamina.worker.worker_factory import build_worker
from megatron_lamina.placement import Placement, placement_lines
from megatron_lamina.topology import ProcessGroups, Topology, init_process_groups

if TYPE_CHECKING:  # a model worker's modules bring Megatron-core, which an attention rank never imports
    from megatron_lamina.worker.attention_worker import AttentionWorker
    from megatron_lamina.worker.model_worker import ModelWorker


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
    placement: Placement | None = None  # where every rank runs (None: an in-process `LLM`)
    liveness: Heartbeat | Watchdog | None = None  # the driver's heartbeat, or this rank's watchdog
    num_host_blocks: int = 0  # the prefix cache's host-tier slots per shard (worker/host_tier.py)


class StartupLog:
    """The driver's start-up lines, with the seconds since the rank started (stderr)."""

    def __init__(self, rank: int):
        self.rank, self.started = rank, time.monotonic()

    def __call__(self, message: str) -> None:
        if self.rank == 0:
            print(f"[lamina {time.monotonic() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)


def job_from_args(args) -> tuple[LaminaConfig, int] | None:
    """Launchers, first thing: the config from --config/--set and this machine's node rank. The
    driver is known from these alone (node 0's first local rank: placement.py sorts it first),
    so a server's rank 0 can bind its port before the other machines have joined. A mistake is
    one `error:` line, printed by the first rank of each machine, and None is returned."""
    from megatron_lamina.checkpoint.auto_convert import with_canonical_checkpoint
    from megatron_lamina.checkpoint.errors import CheckpointInputError
    from megatron_lamina.config import ConfigError, check_device, config_from_args
    from megatron_lamina.launch.nodes import node_rank_of

    try:
        cfg = config_from_args(args)
        check_device(cfg)
        # a Hugging Face directory or GGUF file: converted once (the first rank to come), cached
        cfg = with_canonical_checkpoint(cfg, args.config, log=StartupLog(int(os.environ.get("RANK", "0"))))
        return cfg, node_rank_of(cfg, args, int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None)
    except (ConfigError, CheckpointInputError) as e:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return None


def is_driver(node_rank: int) -> bool:
    return node_rank == 0 and os.environ.get("LOCAL_RANK", "0") == "0"


def join(cfg: LaminaConfig, node_rank: int) -> Placement | None:
    """The job joined with placed ranks (placement.py); machines that do not fit the deployment
    are one `error:` line (first rank of each machine) and None."""
    from megatron_lamina.placement import PlacementError, join_job

    try:
        placement = join_job(cfg, node_rank)
    except PlacementError as e:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return None
    assert (placement.rank == 0) == is_driver(node_rank), "the driver is node 0's first local rank"
    return placement


def start_from_placement(cfg: LaminaConfig, placement: Placement) -> RankContext | None:
    """Launchers: `start_rank` on a joined job. A user's mistake (layout, missing checkpoint)
    is printed by the driver as one `error:` line and None is returned; the launcher exits 2."""
    from megatron_lamina.checkpoint.errors import CheckpointInputError
    from megatron_lamina.config import ConfigError

    try:
        return start_rank(cfg, placement)
    except (ConfigError, CheckpointInputError, FileNotFoundError) as e:
        if placement.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return None


def init_distributed(cfg: LaminaConfig) -> Placement | None:
    """Join the job as one machine would (tests and tools that set torchrun's environment
    themselves); nothing when a process group exists already (`LLM`)."""
    if dist.is_initialized():
        return None
    if "RANK" not in os.environ:
        raise RuntimeError("a rank runs under a launcher: start the job with `lamina serve|generate --config ...` "
                           f"(or torchrun --nproc-per-node {cfg.world_size} launcher/serve.py|generate.py ...)")
    from megatron_lamina.placement import join_job

    return join_job(cfg, node_rank=0)


def start_rank(cfg: LaminaConfig, placement: Placement | None = None) -> RankContext:
    if placement is None:
        placement = init_distributed(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    log = StartupLog(rank)
    arch = read_architecture(cfg.model.checkpoint)
    validate_layout(cfg, world, arch)
    log(f"checkpoint {cfg.model.checkpoint}: {arch.num_layers} layers, hidden {arch.hidden_size}, "
        f"{arch.num_attention_heads}/{arch.num_kv_heads} heads; {world} ranks "
        f"(TP {cfg.parallel.tensor_parallel}, {cfg.parallel.attention_workers} attention workers)")
    topology = Topology.from_config(cfg, arch.num_kv_heads)
    if cfg.micro_batches != cfg.scheduler.micro_batches:
        log(f"scheduler.micro_batches = {cfg.scheduler.micro_batches} runs as {cfg.micro_batches}: colocated, "
            f"micro-batches overlap nothing, and one micro-batch replays whole-step CUDA graphs")
    if placement is not None:
        for line in placement_lines(placement, topology.describe_rank):
            log(line)
    groups = init_process_groups(topology, rank, cfg.runtime.step_timeout_s)
    device = _device(cfg)
    built = build_worker(cfg, arch, topology, groups, rank, device, log)
    dist.barrier(group=groups.startup)  # every rank is ready before the driver takes requests
    # From here on every rank waits for the driver's plans: its heartbeat starts at once.
    names = {r: rank_name(topology, r, placement) for r in range(world)}
    liveness = start_liveness(groups, rank, cfg.runtime.step_timeout_s, names)
    log("every rank is ready")
    return RankContext(cfg, arch, topology, groups, rank, device, built.num_blocks, built.worker, placement,
                       liveness, built.num_host_blocks)


def quiet_gc() -> None:
    """Keep Python's cyclic garbage collector out of the step loop, as vLLM's engine does
    after start-up (a launched rank's process, which serves until the job ends: not `LLM`,
    whose caller owns its process's heap). What start-up built lives as long as the process (the model, the
    tokenizer, the block manager's per-block lists: a million entries at a large cache), and
    a full collection walks every item of every tracked container: `gc.freeze` moves it all
    out of the collector's sight. A step allocates a plan's thousand chunks on every rank,
    which at Python's default threshold ran several young collections per step and, every
    few dozen steps, a full one that walks every running request's tables: a pause that
    grows with batch x context (docs/BENCHMARKS.md, host work per step). Young collections
    now wait for 10,000 allocations. Objects frozen or not yet collected are still freed by
    reference counting; only cycles wait for a collection. At exit the heap is unfrozen, so
    that the interpreter's last collections free what start-up built (native extensions
    such as Triton's report what is still alive then as leaks)."""
    gc.collect()
    gc.freeze()
    collect_rarely()
    atexit.register(gc.unfreeze)


def rank_name(topology: Topology, rank: int, placement: Placement | None) -> str:
    """'rank 2 (attention worker head group 0/1, shard 1/2, node 1)', as errors name a rank."""
    where = f"node {placement.node_of(rank)}" if placement is not None else "this machine"
    return f"rank {rank} ({topology.describe_rank(rank)}, {where})"


def serve_worker(ctx: RankContext) -> int:
    """A non-driver rank: run the driver's plans until its shutdown plan (0). When a step fails
    (the driver or another machine died, or a peer stopped answering) the rank says so in one
    `error:` line naming itself and its node, and returns 1; the driver's side reports the job."""
    from megatron_lamina.worker.control_plane import serve_plans

    quiet_gc()
    try:
        serve_plans(ctx)
        return 0
    except Exception as e:  # a collective failed: nothing of this rank's own to save
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"error: {rank_name(ctx.topology, ctx.rank, ctx.placement)} stopped: {type(e).__name__}: {reason}",
              file=sys.stderr, flush=True)
        return 1


def _device(cfg: LaminaConfig) -> torch.device:
    if cfg.runtime.device == "cpu":
        return torch.device("cpu")
    # Ranks beyond the GPU count share devices (e.g. a disaggregated smoke test on one GPU).
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
