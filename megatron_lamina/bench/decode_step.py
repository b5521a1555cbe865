"""Our decode step on random weights and a random paged cache, for the benchmark tools, and
the roofline it is compared with.

Built from the engine's public pieces, as the worker factory builds a colocated model worker
(worker/worker_factory.py), but for one model reused over many caches and batch sizes (the
factory builds one worker per config): `random_model` (a `LlamaModel` with random weights,
drawn as a random checkpoint's are), `local_worker` (a `ModelWorker` over a `LocalChannel` to an attention backend,
`attention_backend` picking the kernel per device as the factory does), `decode_graphs`
(the colocated decode graphs, captured), `random_cache` (a paged KV cache of random values).
`colocated_decode_ms` times the colocated decode step at batch x context, eager and/or
replayed from graphs. `kv_bytes` and `roofline_s` are the step's memory traffic and its
bound on a device of given copy bandwidth and GEMM rate.
"""

from __future__ import annotations

import torch

from megatron_lamina.architecture import ModelArchitecture
from megatron_lamina.attention.kv_cache import PagedKVCache
from megatron_lamina.bench.plans import blocks_for, decode_plan
from megatron_lamina.bench.timing import kernel_ms, time_ms
from megatron_lamina.worker.cuda_graphs import DecodeGraphs
from megatron_lamina.worker.model_worker import ModelWorker
from megatron_lamina.worker.stage_graphs import StageGraphs
from megatron_lamina.worker.token_feed import TokenFeed
from megatron_lamina.checkpoint.random_weights import fill_random
from megatron_lamina.worker.worker_factory import attention_backend, new_model
from megatron_lamina.model.llama import LlamaModel
from megatron_lamina.transport.channel import LocalChannel


def random_model(arch: ModelArchitecture, tp_group, dtype: torch.dtype = torch.bfloat16, device="cuda",
                 fused: bool = True, std: float = 0.02, fp8_weights: bool = False) -> LlamaModel:
    """This TP rank's shard of `arch` built on `device`, its weights drawn there by the
    random checkpoint's own rule (checkpoint/random_weights.fill_random: matrices N(0, std),
    norms 1, e4m3 linears quantized as the converter quantizes them), with the compiled
    elementwise kernels the engine's graphs use unless `fused` is False."""
    model = new_model(arch, dtype, tp_group, torch.device(device), fused_elementwise=fused, fp8_weights=fp8_weights)
    fill_random(model, seed=0, std=std, tp_rank=tp_group.rank())
    return model


def local_worker(model: LlamaModel, attention, decode_graphs: DecodeGraphs | None = None,
                 stage_graphs: StageGraphs | None = None) -> ModelWorker:
    """A colocated model worker over `attention` (a backend, or a stand-in of bench/stand_ins.py)."""
    return ModelWorker(model, LocalChannel(attention), TokenFeed(model.tp_group, model.device),
                       decode_graphs=decode_graphs, stage_graphs=stage_graphs)


def decode_graphs(model: LlamaModel, attention, batch: int, max_blocks: int, scratch_block: int) -> DecodeGraphs:
    """The colocated decode graphs up to `batch` rows of at most `max_blocks` blocks, captured."""
    graphs = DecodeGraphs(model, attention, batch, max_blocks, scratch_block)
    graphs.capture()
    return graphs


def random_cache(arch: ModelArchitecture, blocks: int, block_size: int, kv_heads: int, dtype: torch.dtype,
                 device, storage: torch.dtype | None = None) -> PagedKVCache:
    """N(0, 1) keys and values (an e4m3 `storage` holds them as converted, scales 1)."""
    cache = PagedKVCache(arch.num_layers, blocks, block_size, kv_heads, arch.head_dim, dtype, device, storage)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, dtype=dtype, device=t.device)) if cache.quantized else t.normal_()
    return cache


def colocated_decode_ms(model: LlamaModel, arch: ModelArchitecture, batch: int, context: int, block_size: int,
                        graph_modes: list[bool], repeat: int = 5,
                        kv_storage: torch.dtype | None = None, kernels: dict | None = None) -> dict[bool, float]:
    """Median ms of our colocated decode step (every request at `context` cached tokens, a
    random paged cache of this rank's KV heads, the engine's attention kernel), eager (False)
    and/or replayed from CUDA graphs (True). A `kernels` dict is filled with one graph step's
    GPU time by kernel kind ("kinds") and its ten costliest kernels ("top"), from the profiler."""
    per_request = blocks_for(context + 1, block_size)
    blocks = batch * per_request
    kv_heads = arch.num_kv_heads // model.tp_group.size()
    cache = random_cache(arch, blocks + 1, block_size, kv_heads, torch.bfloat16, model.device,  # + scratch
                         kv_storage)
    attention = attention_backend(cache, model.device)
    plan = decode_plan(batch, context, block_size)
    result = {}
    for graphs in graph_modes:
        decode = decode_graphs(model, attention, batch, per_request, blocks) if graphs else None
        worker = local_worker(model, attention, decode)
        result[graphs] = time_ms(worker.run, repeat=repeat, inputs=[(plan,)])
        if graphs and kernels is not None:
            kinds, names = kernel_ms(lambda: worker.run(plan))
            kernels.update(kinds=kinds, top=dict(sorted(names.items(), key=lambda kv: -kv[1])[:10]))
        del decode
    del cache, attention
    torch.cuda.empty_cache()
    return result


def kv_bytes(arch: ModelArchitecture, batch: int, context: int, dtype_bytes: int = 2) -> int:
    """K and V of `batch` requests at `context` tokens plus the new one."""
    return 2 * batch * (context + 1) * arch.num_layers * arch.num_kv_heads * arch.head_dim * dtype_bytes


def roofline_s(arch: ModelArchitecture, params: int, batch: int, context: int, copy_bw: float,
               gemm_rate: float) -> float:
    """max((weights + KV read once) / copy bandwidth, FLOPs / GEMM rate) of one bf16 decode step."""
    flops = 2 * params * batch + 4 * batch * (context + 1) * arch.num_attention_heads * arch.head_dim * arch.num_layers
    return max((params * 2 + kv_bytes(arch, batch, context)) / copy_bw, flops / gemm_rate)


def check_context(arch: ModelArchitecture, contexts: list[int], shape_name: str) -> None:
    """A decode context must leave room for the decoded token within the shape's context."""
    too_long = [c for c in contexts if c + 1 > arch.max_position_embeddings]
    if too_long:
        raise ValueError(f"contexts {too_long} do not fit {shape_name}'s {arch.max_position_embeddings}-token "
                         "context; pick a longer preset (llama3.1-8b and llama3.1-70b: 131072 tokens)")

