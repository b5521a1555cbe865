"""What FP8 buys on a Hopper GPU (issue 26): the paged decode kernel reading an e4m3 cache
against bf16, and the colocated decode step with FP8 KV, FP8 weights and both against bf16,
at LLaMA-3-8B's shape and at LLaMA-3-70B's on one card (FP8 weights and KV: 70 GB of weights).

`kernel_rows` times `paged_decode` replayed from a CUDA graph at LLaMA-3-8B's attention shape
(32 query / 8 KV heads of 128) and reports each as a fraction of the measured copy bandwidth,
counting the bytes the kernel must read (K and V once, at their stored width, plus q and o):
on each cache, its default and then a coordinate search over the dots' type for e4m3 and
the launch settings (tile, warps, stages, splits), so that one device call finds each
cache's best.
`decode_rows` times the whole colocated decode step from the engine's decode graphs on random
weights and a random cache (bench/decode_step.py) for each mode, against its roofline: the
weights and KV bytes read once over the copy bandwidth, or the FLOPs over the bf16 GEMM rate
(FP8 matmuls: twice it). `quant_rows` times one FP8 linear at LLaMA-3-8B's shapes with torch's
per-token quantization and with the fused kernel (model/fp8_quant_triton.py) against bf16, and
the quantization alone. tools/bench_fp8.py is the command line.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
import torch.distributed as dist

from megatron_lamina.attention.triton_paged import default_block_n, default_dots, default_stages, paged_decode, split_count
from megatron_lamina.bench.coordinate_search import coordinate_search
from megatron_lamina.bench.decode_step import colocated_decode_ms, random_model
from megatron_lamina.bench.timing import graph_ms
from megatron_lamina.fp8 import FP8, quantize_rows, quantize_weight
from megatron_lamina.model.fp8_linear import fp8_matmul, scaled_matmul
from megatron_lamina.model.fp8_quant_triton import MAX_BLOCK, quantize_rows_fused
from megatron_lamina.planner.shapes import load_shape

# (label, FP8 weights, KV storage); the first is the baseline.
MODES = [("bf16", False, None), ("FP8 KV", False, FP8), ("FP8 weights", True, None),
         ("FP8 weights + KV", True, FP8)]


# The decode kernel's sweep (issue 26): paged_decode's dots and launch settings, searched
# one axis at a time from each cache's default (bench/coordinate_search.py). "dots" only
# changes an e4m3 cache's kernel; "splits" is `waves`, kept where it changes the split count.
KERNEL_AXES = [
    ("dots", [{"fp8_dots": "q"}, {"fp8_dots": "fp16"}]),
    ("tile", [{"block_n": n, "num_warps": w} for n, w in ((64, 4), (64, 8), (128, 4), (128, 8), (256, 4), (256, 8))]),
    ("stages", [{"num_stages": s} for s in (2, 3, 4, 5, 6, 7)]),  # 6-7: e4m3 tiles of 128 keys still fit
    ("splits", [{"waves": w} for w in (1.0, 2.0, 4.0, 8.0)]),
]


def kernel_default(fp8: bool) -> dict:
    """paged_decode's own defaults for the swept settings (read off its signature and its
    default_* rules: one rule)."""
    params = inspect.signature(paged_decode).parameters
    return {"num_warps": params["num_warps"].default, "waves": params["waves"].default,
            "block_n": default_block_n(fp8), "num_stages": default_stages(fp8, default_block_n(fp8)),
            "fp8_dots": default_dots(torch.bfloat16)}  # (the sweep's q is bf16)


def variant_label(config: dict, fp8: bool) -> str:
    """The dots' type of a sweep row (its q is bf16; a bf16 cache ignores `fp8_dots`)."""
    return "fp16 dots" if fp8 and config["fp8_dots"] == "fp16" else "bf16 dots"


def kernel_rows(batch: int, context: int, copy_bw: float, block_size: int = 16, axes=KERNEL_AXES,
                on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """The paged decode kernel on a bf16 and an e4m3 cache, each searched over `axes` from its
    default (the first row of each): ms, the fraction of copy bandwidth counting the bytes
    each reads (K and V at their stored width, q and o), `speedup` against the bf16 default,
    and `rel_err`, the output's relative difference from its cache's default (a variant is
    the same attention: a wrong one shows here, not only in the CPU tests). `on_row` is
    handed each row as it is measured (so that a crash mid-sweep still leaves the rest)."""
    heads, kv_heads, d = 32, 8, 128
    blocks_each = math.ceil(context / block_size)
    tables = torch.randperm(batch * blocks_each, device="cuda").view(batch, blocks_each).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, d, dtype=torch.bfloat16, device="cuda")
    shape = (batch * blocks_each, kv_heads, block_size, d)
    rows = []
    for label, storage in (("bf16", torch.bfloat16), ("fp8_e4m3", FP8)):
        fp8 = storage == FP8
        k, v = (torch.randn(shape, device="cuda").to(storage) for _ in range(2))
        scales = {"k_scale": torch.ones(kv_heads, device="cuda"), "v_scale": torch.ones(kv_heads, device="cuda")} \
            if fp8 else {}
        read = 2 * batch * context * kv_heads * d * storage.itemsize + 2 * q.numel() * q.element_size()
        outputs = {}  # launch -> its output, to hold each variant to the default's

        def splits(config: dict) -> int:
            return split_count(batch, kv_heads, context, config["block_n"], config["waves"], q.device)

        def measure(config: dict) -> float:
            def call(k, v):
                return paged_decode(q, k, v, tables, lens, max_context=context, **scales, **config)
            outputs[launch(config)] = call(k, v).float()
            return graph_ms(call, [(k, v)])

        def launch(config: dict):  # what makes two configurations the same kernel launch
            flags = {**config, "fp8_dots": config["fp8_dots"] if fp8 else "q", "waves": splits(config)}
            return tuple(sorted(flags.items()))

        start = kernel_default(fp8)
        for found in coordinate_search(measure, start, axes, key=launch):
            config, ms = found["config"], found["ms"]
            row = {"kv": label, "axis": found["axis"], "variant": variant_label(config, fp8),
                   "block_n": config["block_n"], "warps": config["num_warps"], "stages": config["num_stages"],
                   "waves": config["waves"], "splits": splits(config), "ms": ms,
                   "of_copy_bandwidth": read / (ms / 1e3) / copy_bw if ms else None,
                   "TBps": read / (ms / 1e3) / 1e12 if ms else None, "config": config}
            if launch(config) in outputs and launch(start) in outputs:
                want = outputs[launch(start)]
                row["rel_err"] = ((outputs[launch(config)] - want).norm() / want.norm()).item()
            if found["error"]:
                row["error"] = found["error"]
            rows.append(row)
            if on_row:
                on_row(row)
    for row in rows:
        row["speedup"] = rows[0]["ms"] / row["ms"] if row["ms"] else None
    return rows


def best_kernel_rows(rows: list[dict]) -> dict[str, dict]:
    """The fastest row of each cache type."""
    best = {}
    for row in rows:
        if row["ms"] and (row["kv"] not in best or row["ms"] < best[row["kv"]]["ms"]):
            best[row["kv"]] = row
    return best


KERNEL_COLUMNS = {"kv": "kv", "axis": "axis", "variant": "variant", "block_n": "BLOCK_N", "warps": "warps",
                  "stages": "stages", "splits": "splits", "ms": "ms", "of_copy_bandwidth": "of copy BW",
                  "speedup": "vs bf16 default", "rel_err": "rel. err vs default"}


def decode_rows(shape_name: str, batch: int, context: int, copy_bw: float, gemm: float, modes=MODES,
                block_size: int = 16, kernels: bool = False) -> list[dict]:
    """The colocated decode step from graphs, per mode; needs a one-rank process group. With
    `kernels`, each row also holds one step's GPU time by kernel kind and its costliest
    kernels (bench/decode_step.colocated_decode_ms)."""
    shape = load_shape(shape_name)
    arch = shape.to_architecture()
    rows, model, model_fp8 = [], None, None
    for label, fp8_weights, kv_storage in modes:
        if model is None or model_fp8 != fp8_weights:  # one model per weight dtype
            del model
            torch.cuda.empty_cache()
            model, model_fp8 = random_model(arch, dist.group.WORLD, fp8_weights=fp8_weights), fp8_weights
        profile = {} if kernels else None
        try:
            ms = colocated_decode_ms(model, arch, batch, context, block_size, [True], repeat=5,
                                     kv_storage=kv_storage, kernels=profile)[True]
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
                     "tokens_per_s": batch / (ms / 1e3) if ms else None, **({"kernels": profile} if profile else {})})
    del model
    torch.cuda.empty_cache()
    if rows[0]["ms"]:
        for row in rows[1:]:
            row["speedup"] = rows[0]["ms"] / row["ms"] if row["ms"] else None
            row["speedup_over"] = rows[0]["mode"]
    return rows


# LLaMA-3-8B's linears at a decode batch of 256: the QKV projection (the hidden size in) and
# fc2 (the MLP's intermediate size in), the two input widths a layer quantizes.
QUANT_SHAPES = (("QKV", 256, 4096, 6144), ("fc2", 256, 14336, 4096))


def quant_rows(copy_bw: float, shapes=QUANT_SHAPES, max_blocks=(4096, 8192, MAX_BLOCK)) -> list[dict]:
    """Per shape, each replayed from CUDA graphs: the bf16 matmul, the FP8 one after torch's
    quantization (fp8.quantize_rows) and after the fused kernel (fp8_matmul on CUDA), ms and
    speedup over bf16; then the quantization alone, torch's and the fused kernel's at each tile
    bound (`max_blocks`; a longer row takes two passes) with the GPU's cast, and with the bitwise
    cast the CPU tests run, each as a fraction of copy bandwidth counting the bytes it must move
    (the input read once, the e4m3 values and float32 scales written)."""
    rows = []
    for name, batch, n_in, n_out in shapes:
        x = torch.randn(batch, n_in, dtype=torch.bfloat16, device="cuda")
        weight = 0.02 * torch.randn(n_out, n_in, dtype=torch.bfloat16, device="cuda")
        weight_q, weight_scale = quantize_weight(weight)
        matmuls = {"bf16 matmul": lambda: torch.nn.functional.linear(x, weight),
                   "fp8, torch quantize": lambda: scaled_matmul(*quantize_rows(x), weight_q, weight_scale),
                   "fp8, fused quantize": lambda: fp8_matmul(x, weight_q, weight_scale)}
        quantizers = {"quantize: torch": lambda: quantize_rows(x),
                      **{f"quantize: fused, tile {b}": (lambda b=b: quantize_rows_fused(x, max_block=b))
                         for b in max_blocks},
                      "quantize: fused, bitwise cast": lambda: quantize_rows_fused(x, emulate_cast=True)}
        moved = batch * n_in * (x.element_size() + 1) + batch * 4
        shape = {"linear": name, "shape": f"{batch} x {n_in} -> {n_out}"}
        bf16_ms = None
        for label, fn in matmuls.items():
            ms = graph_ms(fn, [()])
            bf16_ms = bf16_ms or ms
            rows.append({**shape, "case": label, "ms": ms, "speedup": bf16_ms / ms})
        for label, fn in quantizers.items():
            ms = graph_ms(fn, [()])
            rows.append({**shape, "case": label, "ms": ms, "of_copy_bandwidth": moved / (ms / 1e3) / copy_bw})
    return rows


def markdown(rows: list[dict], columns: dict[str, str] | None = None) -> str:
    """A markdown table of `rows`: `columns` {key: heading} (default: every key, as named)."""
    columns = columns or {k: k for k in dict.fromkeys(k for row in rows for k in row)}
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row.get(k):.3g}" if isinstance(row.get(k), float) else str(row.get(k, ""))
                                       for k in columns) + " |")
    return "\n".join(lines)
