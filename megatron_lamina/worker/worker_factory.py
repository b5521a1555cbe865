"""Builds the worker of one rank from the config: the one way to make a model or attention worker.

Launchers (through runtime.start_rank), tests and tools all ask `build_worker`. It decides
what the rank is from the topology and builds it in the order that sizes the KV cache right
(memory.py):
  * model worker: the model with its TP shard of the weights (or `weights`, a function that
    fills a model, for tools), moved to the device (or, when its weights are drawn there, built
    on it: `new_model`); with CUDA graphs, the stage graphs at
    every token bucket (stage_graphs.py); colocated, the decode graphs' memory learnt on a
    tiny cache and the eager activations of the largest step measured; then the cache, of the
    block count every rank agrees on, and the decode graphs captured over it;
  * attention worker: the eager activations of the largest step measured, the cache, the
    endpoint of the transport.
Both ends of the transport get `runtime.q_first` from the same config (colocated layouts have
no transport and ignore it).
Every phase prints a line through `log` (the driver's start-up log). Nothing is captured
later: the server answers /health only once this has returned.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from megatron_lamina.architecture import ModelArchitecture
from megatron_lamina.attention.kv_cache import PagedKVCache, storage_dtype
from megatron_lamina.config import LaminaConfig
from megatron_lamina.worker.attention_worker import AttentionWorker
from megatron_lamina.worker.block_tables import BlockTables
from megatron_lamina.worker.host_tier import HostTier, host_blocks, sizing_line
from megatron_lamina.worker.memory import kv_blocks_that_fit, measure_peak
from megatron_lamina.fp8 import FP8_NAME, KV_CAPABILITY, MATMUL_CAPABILITY, require_fp8
from megatron_lamina.host_to_device import to_device
from megatron_lamina.plan import MicroBatch, SequenceChunk, StepPlan
from megatron_lamina.topology import ProcessGroups, Topology
from megatron_lamina.transport.channel import LocalChannel
from megatron_lamina.transport.p2p import AttentionEndpoint, P2PChannel

if TYPE_CHECKING:
    from megatron_lamina.model.llama import LlamaModel
    from megatron_lamina.worker.model_worker import ModelWorker

Log = Callable[[str], None]


@dataclass
class BuiltWorker:
    worker: ModelWorker | AttentionWorker
    num_blocks: int          # KV blocks per cache (every rank agrees)
    cache: PagedKVCache | None
    num_host_blocks: int = 0  # the prefix cache's host-tier slots per cache (every rank computes the same)


def use_cuda_graphs(cfg: LaminaConfig, topology: Topology, device: torch.device) -> bool:
    """Graphs on a GPU, unless switched off; at TP > 1 they hold the TP all-reduces, so the TP
    group must reduce CUDA tensors through NCCL (a gloo collective cannot be captured)."""
    return (cfg.runtime.cuda_graphs and device.type == "cuda"
            and (topology.tp_size == 1 or dist.get_backend() != "gloo"))


def attention_backend(cache: PagedKVCache, device: torch.device):
    """The torch reference on CPU; the Triton decode kernel + prefill path on CUDA."""
    if device.type == "cuda":
        from megatron_lamina.attention.gpu import PagedAttention

        return PagedAttention(cache)
    from megatron_lamina.attention.reference import ReferenceAttention

    return ReferenceAttention(cache)


def build_worker(cfg: LaminaConfig, arch: ModelArchitecture, topology: Topology, groups: ProcessGroups,
                 rank: int, device: torch.device, log: Log = lambda _: None,
                 weights: Callable[[LlamaModel], None] | None = None) -> BuiltWorker:
    """`weights(model)` fills a model worker's parameters on its device (tools: random
    weights); None loads this rank's shard of `cfg.model.checkpoint`, or, for a checkpoint
    whose tensors are drawn at load (checkpoint/random_weights.write_random_spec), draws them."""
    if topology.is_model_worker(rank):
        return _model_worker(cfg, arch, topology, groups, rank, device, log, weights)
    return _attention_worker(cfg, arch, topology, groups, rank, device, log)


def _model_worker(cfg, arch, topology, groups, rank, device, log, weights) -> BuiltWorker:
    # Here, not at the top: an attention worker's rank never imports Megatron-core, whose import
    # is most of a model rank's start-up.
    from megatron_lamina.checkpoint.loader import CheckpointShardLoader, weight_format
    from megatron_lamina.checkpoint.random_weights import fill_random, generated_at_load
    from megatron_lamina.worker.model_worker import ModelWorker
    from megatron_lamina.worker.token_feed import TokenFeed

    graphs = use_cuda_graphs(cfg, topology, device)
    fp8_weights, quantize = weight_format(cfg.model.weight_dtype, cfg.model.checkpoint)
    if fp8_weights:
        what = "model.weight_dtype = 'fp8_e4m3'" if quantize else f"checkpoint {cfg.model.checkpoint}"
        require_fp8(device, MATMUL_CAPABILITY, f"{what} (FP8 weights: torch._scaled_mm)",
                    "serve unquantized weights (model.weight_dtype bfloat16, a checkpoint converted without "
                    "--weight-dtype)")
    random = generated_at_load(cfg.model.checkpoint) if weights is None else None
    # Weights filled on the device (drawn at load, or a tool's) need no host copy of the model:
    # a 70B shape's parameters would take its whole size in host memory before `.to(device)`.
    filled_on_device = weights is not None or random is not None
    model = new_model(arch, cfg.torch_dtype, groups.tp, device if filled_on_device else torch.device("cpu"),
                      fused_elementwise=graphs, fp8_weights=fp8_weights)
    if not filled_on_device:
        CheckpointShardLoader(cfg.model.checkpoint, rank, topology.tp_size, cfg.torch_dtype,
                              quantize_fp8=quantize).load_into(model)
    model = model.to(device)
    if random is not None:  # drawn on the device: a 70B model's weights never pass the host
        weights = functools.partial(fill_random, seed=random["seed"], std=random["std"], tp_rank=rank)
    if weights is not None:
        weights(model)
    gib = sum(p.numel() * p.element_size() for p in model.parameters()) / (1 << 30)
    log(f"weights loaded: {gib:.2f} GiB on {device} (TP rank {rank} of {topology.tp_size})"
        + (", linear layers in fp8_e4m3" + (" (quantized at load)" if quantize else "") if fp8_weights else "")
        + (", random (drawn at load)" if random is not None else ""))
    feed = TokenFeed(groups.tp, device)
    s = cfg.scheduler
    stage_graphs = pool = None
    if graphs:
        from megatron_lamina.worker.stage_graphs import StageGraphs

        pool = torch.cuda.graph_pool_handle()
        stage_graphs = StageGraphs(model, s.max_batch_size + s.max_prefill_tokens, cfg.micro_batches, pool)
        stage_graphs.capture(log)
    if not topology.colocated:
        num_blocks = _agree(cfg, groups, None)
        log(f"{_kv_cache_size(cfg, num_blocks)} per attention worker")
        kv_lo, _ = topology.tp_kv_range(rank)
        host_staging = device.type == "cuda" and dist.get_backend() == "gloo"
        channel = P2PChannel(topology.routes_from_tp(rank), kv_lo, arch.queries_per_kv_head, host_staging,
                             groups.to_attention, groups.to_model, q_first=cfg.runtime.q_first)
        kv_heads = arch.num_kv_heads // topology.head_groups
        host = _host_slots(cfg, arch, kv_heads)
        if host:  # what each attention worker's tier holds (their own lines are not printed)
            log(sizing_line(host, cfg.kv_cache.block_size, host * _bytes_per_block(cfg, arch, kv_heads),
                            device.type == "cuda", f"per attention worker (kv_cache.host_cache_gib = "
                            f"{cfg.kv_cache.host_cache_gib:g}, whole blocks)"))
        return BuiltWorker(ModelWorker(model, channel, feed, stage_graphs=stage_graphs), num_blocks, None, host)

    kv_heads = arch.num_kv_heads // topology.tp_size
    max_blocks = math.ceil(arch.max_position_embeddings / cfg.kv_cache.block_size)

    def worker_over(cache: PagedKVCache, decode_graphs, host_tier: HostTier | None = None) -> ModelWorker:
        return ModelWorker(model, LocalChannel(attention_backend(cache, device)), feed, block_tables(cfg, arch, None, device),
                           decode_graphs, stage_graphs, host_tier)

    def decode_graphs_over(cache: PagedKVCache, scratch: int):
        from megatron_lamina.worker.cuda_graphs import DecodeGraphs

        decode = DecodeGraphs(model, attention_backend(cache, device), s.max_batch_size, max_blocks, scratch, pool)
        decode.capture(log)
        return decode

    peak = 0
    if device.type == "cuda":  # on a tiny cache: the memory the steps need, and every kernel compiled
        probe = _cache(cfg, arch, 2, kv_heads, device)
        decode = decode_graphs_over(probe, scratch=1) if graphs and cfg.kv_cache.num_blocks == "auto" else None
        peak = _profile_largest_step(cfg, arch, worker_over(probe, decode), device)
        del probe, decode
    num_blocks = _agree(cfg, groups, (_bytes_per_block(cfg, arch, kv_heads), peak, device, log))
    # With decode graphs the cache has one more block, never handed out: padding rows' scratch.
    cache = _cache(cfg, arch, num_blocks + graphs, kv_heads, device)
    decode = decode_graphs_over(cache, scratch=num_blocks) if graphs else None
    host = _host_slots(cfg, arch, kv_heads)
    tier = _host_tier(cache, host, 0, log)
    return BuiltWorker(worker_over(cache, decode, tier), num_blocks, cache, host)


def new_model(arch: ModelArchitecture, dtype: torch.dtype, tp_group, device: torch.device,
              fused_elementwise: bool = False, fp8_weights: bool = False) -> LlamaModel:
    """This TP rank's model, its parameters and buffers allocated on `device`, unfilled: built
    under a `torch.device` context, which places every tensor made without a device (Megatron's
    layers make theirs so, given `use_cpu_initialization`) there."""
    from megatron_lamina.checkpoint.loader import padded_vocab_size
    from megatron_lamina.model.llama import LlamaModel

    with device:
        return LlamaModel(arch, dtype, tp_group, padded_vocab_size(arch.vocab_size, tp_group.size()),
                          fused_elementwise=fused_elementwise, fp8_weights=fp8_weights)


def _attention_worker(cfg, arch, topology, groups, rank, device, log) -> BuiltWorker:
    group, shard = topology.attention_coords(rank)
    kv_lo, _ = topology.group_kv_range(group)
    kv_heads = arch.num_kv_heads // topology.head_groups
    peak = 0
    if device.type == "cuda":  # on a tiny cache: the memory the steps need, and every kernel compiled
        probe = _cache(cfg, arch, 1, kv_heads, device)
        peak = _profile_attention(cfg, arch, attention_backend(probe, device), kv_heads, device)
        del probe
    num_blocks = _agree(cfg, groups, (_bytes_per_block(cfg, arch, kv_heads), peak, device, log))
    cache = _cache(cfg, arch, num_blocks, kv_heads, device)
    host_staging = device.type == "cuda" and dist.get_backend() == "gloo"
    endpoint = AttentionEndpoint(topology.routes_to_attention(rank), shard, kv_lo, kv_heads,
                                 arch.queries_per_kv_head, arch.head_dim, cfg.torch_dtype, device, host_staging,
                                 groups.to_attention, groups.to_model, q_first=cfg.runtime.q_first)
    host = _host_slots(cfg, arch, kv_heads)
    return BuiltWorker(AttentionWorker(endpoint, attention_backend(cache, device), arch.num_layers, device,
                                       block_tables(cfg, arch, shard, device), _host_tier(cache, host, shard, log)),
                       num_blocks, cache, host)


def _host_slots(cfg: LaminaConfig, arch: ModelArchitecture, kv_heads: int) -> int:
    """The prefix cache's host-tier slots of every cache (kv_cache.host_cache_gib over the
    bytes of one block of a cache of `kv_heads`: every cache of a layout holds as many)."""
    if not cfg.kv_cache.prefix_caching or cfg.kv_cache.host_cache_gib == 0:
        return 0
    return host_blocks(cfg.kv_cache.host_cache_gib, _bytes_per_block(cfg, arch, kv_heads))


def _host_tier(cache: PagedKVCache, slots: int, shard: int, log: Log) -> HostTier | None:
    if slots == 0:
        return None
    tier = HostTier(cache, slots, shard)
    log(sizing_line(slots, cache.block_size, tier.nbytes, tier.pinned_bytes > 0, "per cache"))
    return tier


def block_tables(cfg: LaminaConfig, arch: ModelArchitecture, shard: int | None, device) -> BlockTables:
    """A cache-holding rank's block tables, sized for the batch and the model's context."""
    return BlockTables(shard, cfg.scheduler.max_batch_size,
                       math.ceil(arch.max_position_embeddings / cfg.kv_cache.block_size), device)


def _cache(cfg: LaminaConfig, arch: ModelArchitecture, blocks: int, kv_heads: int, device) -> PagedKVCache:
    """A cache of `blocks` blocks of this rank's `kv_heads`, storing `kv_cache.dtype`."""
    if cfg.kv_cache.dtype == FP8_NAME:
        require_fp8(device, KV_CAPABILITY, "kv_cache.dtype = 'fp8_e4m3' (the Triton kernels' e4m3 loads)",
                    "use --set kv_cache.dtype=auto")
    return PagedKVCache(arch.num_layers, blocks, cfg.kv_cache.block_size, kv_heads, arch.head_dim, cfg.torch_dtype,
                        device, storage_dtype(cfg.kv_cache.dtype, cfg.torch_dtype))


def _kv_cache_size(cfg: LaminaConfig, blocks: int) -> str:
    """'KV cache (fp8_e4m3): 100 blocks of 16 tokens, 1,600 tokens', the start of the sizing line."""
    dtype = cfg.kv_cache.dtype if cfg.kv_cache.dtype != "auto" else cfg.model.dtype
    return (f"KV cache ({dtype}): {blocks} blocks of {cfg.kv_cache.block_size} tokens, "
            f"{blocks * cfg.kv_cache.block_size:,} tokens")


def _bytes_per_block(cfg: LaminaConfig, arch: ModelArchitecture, kv_heads: int) -> int:
    return PagedKVCache.bytes_per_block(arch.num_layers, cfg.kv_cache.block_size, kv_heads, arch.head_dim,
                                        storage_dtype(cfg.kv_cache.dtype, cfg.torch_dtype))


def _largest_step(cfg: LaminaConfig, arch: ModelArchitecture) -> StepPlan:
    """The most tokens one step can carry: a whole prefill budget and the rest of the batch
    decoding, every row sampled; all in block 0 of a probe cache (values do not matter),
    announced as `new_blocks` for the worker's own block tables."""
    prefill = min(cfg.scheduler.max_prefill_tokens, arch.max_position_embeddings - 1)
    blocks = math.ceil(prefill / cfg.kv_cache.block_size)
    chunks = [SequenceChunk(0, 0, 0, [0] * prefill, [0] * blocks, True, block_table=[0] * blocks)]
    chunks += [SequenceChunk(i, 0, 0, [0], [0], True, block_table=[0]) for i in range(1, cfg.scheduler.max_batch_size)]
    return StepPlan([MicroBatch(chunks)])


def _longest_decode(cfg: LaminaConfig, arch: ModelArchitecture) -> StepPlan:
    """One decode row at the longest context (split over the multiprocessors: the decode
    kernel's float32 variant and its merge kernel), all in block 0 (request 0's table of the
    largest step released first)."""
    context = arch.max_position_embeddings - 1
    blocks = math.ceil((context + 1) / cfg.kv_cache.block_size)
    return StepPlan([MicroBatch([SequenceChunk(0, 0, context, [0], [0] * blocks, True, block_table=[0] * blocks)])],
                    released=[0])


def _profile_largest_step(cfg, arch, worker: ModelWorker, device) -> int:
    """Peak memory of the largest step and its sampling (top-p sorts the vocabulary); with the
    longest decode after it, every kernel an eager step can launch is compiled here."""
    from megatron_lamina.driver.sampling import sample_tokens_on_device
    from megatron_lamina.requests.sampling_params import SamplingParams

    plan = _largest_step(cfg, arch)
    params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50)] * plan.num_sampled
    with measure_peak(device) as peak:
        logits = worker.run(plan)
        sample_tokens_on_device(logits, params, [p.make_generator(device) for p in params])
        del logits
    worker.run(_longest_decode(cfg, arch))
    return peak[0]


def _profile_attention(cfg, arch, attend, kv_heads: int, device) -> int:
    d, heads = arch.head_dim, kv_heads * arch.queries_per_kv_head
    peaks = []
    for plan in (_largest_step(cfg, arch), _longest_decode(cfg, arch)):
        rows = plan.micro_batches[0].num_rows
        with measure_peak(device) as peak:
            [index] = to_device([attend.host_index(plan.micro_batches[0].chunks)], device)
            q = torch.randn(rows, heads, d, dtype=cfg.torch_dtype, device=device)
            k = torch.randn(rows, kv_heads, d, dtype=cfg.torch_dtype, device=device)
            # The receive buffers of the transport and the reply: about q, k, v and o once more.
            extra = torch.empty(2 * q.numel() + 2 * k.numel(), dtype=cfg.torch_dtype, device=device)
            attend(0, index, q, k, k.clone())
            del q, k, extra
        peaks.append(peak[0])
    return max(peaks)


def _agree(cfg: LaminaConfig, groups: ProcessGroups, sizing) -> int:
    """The KV block count of every cache: the configured one, or the smallest that fits any
    rank. `sizing`: (bytes per block, eager activation peak, device, log) on a rank that
    holds a cache, None on one that does not. A collective over every rank."""
    if cfg.kv_cache.num_blocks != "auto":
        if sizing is not None:
            sizing[3](f"{_kv_cache_size(cfg, cfg.kv_cache.num_blocks)} per cache (kv_cache.num_blocks)")
        return cfg.kv_cache.num_blocks
    capacity = torch.tensor([2**62], dtype=torch.long)
    why = "sized by the ranks that hold a cache"
    if sizing is not None:
        per_block, peak, device, log = sizing
        blocks, why = kv_blocks_that_fit(device, cfg.kv_cache.memory_fraction, per_block, peak)
        capacity[0] = blocks
    dist.all_reduce(capacity, op=dist.ReduceOp.MIN, group=groups.startup)
    blocks = int(capacity.item())
    if blocks < 1:
        raise RuntimeError("kv_cache.num_blocks = auto found no memory for even one KV block "
                           f"({why}); raise kv_cache.memory_fraction, lower the model size or the batch "
                           "(scheduler.max_batch_size, scheduler.max_prefill_tokens), or set kv_cache.num_blocks")
    if sizing is not None:
        sizing[3](f"{_kv_cache_size(cfg, blocks)} per cache, the smallest any rank "
                  f"can hold; this rank: {why}")
    return blocks
