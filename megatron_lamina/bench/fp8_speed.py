"""What FP8 buys on a Hopper GPU (issue 26): the paged decode kernel reading an e4m3 cache
against bf16, and the colocated decode step with FP8 KV, FP8 weights and both against bf16,
at LLaMA-3-8B's shape and at LLaMA-3-70B's on one card (FP8 weights and KV: 70 GB of weights).

`kernel_rows` times `paged_decode` replayed from a CUDA graph at LLaMA-3-8B's attention shape
(32 query / 8 KV heads of 128) and reports each as a fraction of the measured copy bandwidth,
counting the bytes the kernel must read (K and V once, at their stored width, plus q and o).
`decode_rows` times the whole colocated decode step from the engine's decode graphs on random
weights and a random cache (bench/decode_step.py) for each mode, against its roofline: the
weights and KV bytes read once over the copy bandwidth, or the FLOPs over the bf16 GEMM rate
(FP8 matmuls: twice it). tools/bench_fp8.py is the command line.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_lamina.attention.triton_paged import paged_decode
from megatron_lamina.bench.decode_step import colocated_decode_ms, random_model
from megatron_lamina.bench.timing import graph_ms
from megatron_lamina.fp8 import FP8
from megatron_lamina.planner.shapes import load_shape

# (label, FP8 weights, KV storage); the first is the baseline.
MODES = [("bf16", False, None), ("FP8 KV", False, FP8), ("FP8 weights", True, None),
         ("FP8 weights + KV", True, FP8)]


def kernel_rows(batch: int, context: int, copy_bw: float, block_size: int = 16,
                tiles=((64, 4), (128, 4), (128, 8), (256, 8))) -> list[dict]:
    """The paged decode kernel on a bf16 and an e4m3 cache, at each (BLOCK_N, num_warps) of
    `tiles` (`paged_decode`'s defaults: (64, 4) for bf16, (128, 4) for e4m3): ms, and the
    fraction of copy bandwidth counting the bytes each reads; `speedup` against bf16 at the first tile."""
    heads, kv_heads, d = 32, 8, 128
    blocks_each = math.ceil(context / block_size)
    tables = torch.randperm(batch * blocks_each, device="cuda").view(batch, blocks_each).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, d, dtype=torch.bfloat16, device="cuda")
    shape = (batch * blocks_each, kv_heads, block_size, d)
    rows = []
    for label, storage in (("bf16", torch.bfloat16), ("fp8_e4m3", FP8)):
        k, v = (torch.randn(shape, device="cuda").to(storage) for _ in range(2))
        scales = {"k_scale": torch.ones(kv_heads, device="cuda"), "v_scale": torch.ones(kv_heads, device="cuda")} \
            if storage == FP8 else {}
        read = 2 * batch * context * kv_heads * d * storage.itemsize + 2 * q.numel() * q.element_size()
        for block_n, warps in tiles:
            ms = graph_ms(lambda k, v: paged_decode(q, k, v, tables, lens, max_context=context, block_n=block_n,
                                                    num_warps=warps, **scales), [(k, v)])
            rows.append({"kv": label, "batch": batch, "context": context, "block_n": block_n, "warps": warps,
                         "ms": ms, "TBps": read / (ms / 1e3) / 1e12, "of_copy_bandwidth": read / (ms / 1e3) / copy_bw})
        del k, v
    for row in rows:
        row["speedup"] = rows[0]["ms"] / row["ms"]
    return rows


def decode_rows(shape_name: str, batch: int, context: int, copy_bw: float, gemm: float, modes=MODES,
                block_size: int = 16) -> list[dict]:
    """The colocated decode step from graphs, per mode; needs a one-rank process group."""
    shape = load_shape(shape_name)
    arch = shape.to_architecture()
    rows, model, model_fp8 = [], None, None
    for label, fp8_weights, kv_storage in modes:
        if model is None or model_fp8 != fp8_weights:  # one model per weight dtype
            del model
            torch.cuda.empty_cache()
            model, model_fp8 = random_model(arch, dist.group.WORLD, fp8_weights=fp8_weights), fp8_weights
        try:
            ms = colocated_decode_ms(model, arch, batch, context, block_size, [True], repeat=5,
                                     kv_storage=kv_storage)[True]
        except torch.OutOfMemoryError:
            ms = None
        torch.cuda.empty_cache()
        linear = shape.num_layers * (shape.layer_params - 2 * shape.hidden_size)
        weight_bytes = linear * (1 if fp8_weights else 2) + (shape.params - linear) * 2
        kv = 2 * batch * (context + 1) * shape.num_layers * shape.num_kv_heads * shape.head_dim
        kv_bytes = kv * (1 if kv_storage == FP8 else 2)
        flops = 2 * shape.params * batch + 4 * batch * (context + 1) * shape.num_heads * shape.head_dim * shape.num_layers
        roofline_ms = 1e3 * max((weight_bytes + kv_bytes) / copy_bw, flops / (gemm * (2 if fp8_weights else 1)))
        rows.append({"shape": shape_name, "mode": label, "batch": batch, "context": context, "ms": ms,
                     "roofline_ms": roofline_ms, "of_roofline": roofline_ms / ms if ms else None,
                     "tokens_per_s": batch / (ms / 1e3) if ms else None})
    del model
    torch.cuda.empty_cache()
    if rows[0]["ms"]:
        for row in rows[1:]:
            row["speedup"] = rows[0]["ms"] / row["ms"] if row["ms"] else None
            row["speedup_over"] = rows[0]["mode"]
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row.get(k):.3g}" if isinstance(row.get(k), float) else str(row.get(k, ""))
                                       for k in keys) + " |")
    return "\n".join(lines)
