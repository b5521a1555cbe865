"""Benchmarks (b) and (c) of the GPU issue: the model-worker step and the colocated decode
step, on a LLaMA-shaped model with random bf16 weights, against the roofline; the program of
tools/bench_decode.py.

    python tools/bench_decode.py --batches 64,128,256 --contexts 1024,4096 --out decode.json
    torchrun --nproc-per-node 2 tools/bench_decode.py ...   # colocated TP 2 over NCCL, one GPU a rank

One process, one GPU, our real model (`LlamaModel` on Megatron-core layers) and runner:
  * model-worker step (b): the attention channel returns at once (o = 0), so the step is
    embedding, all non-attention GEMMs and the LM head of `batch` decode tokens; reported as
    a fraction of the measured bf16 GEMM rate (2 x batch x the parameters of the matrix
    products, i.e. all but the embedding table, in FLOPs);
  * colocated decode step (c): the real paged KV cache (filled with random values, every
    request at `context` tokens) and the Triton decode kernel; reported as tokens/s and as a
    fraction of the roofline bound max(bytes / copy bandwidth, FLOPs / GEMM rate), bytes =
    weights + the KV read once, FLOPs = 2 x parameters x batch + attention.
Sampling, the scheduler and the driver's plan broadcast are not in the timed region.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_lamina.architecture import ModelArchitecture
from megatron_lamina.attention.kv_cache import PagedKVCache
from megatron_lamina.bench.decode_step import (
    check_context,
    colocated_decode_ms,
    decode_graphs,
    kv_bytes,
    local_worker,
    random_model,
    roofline_s,
)
from megatron_lamina.bench.plans import decode_plan
from megatron_lamina.bench.ranks import init_one_rank, init_torchrun_tp
from megatron_lamina.bench.stand_ins import ZeroAttention
from megatron_lamina.bench.timing import ceilings, kernel_ms, time_ms
from megatron_lamina.planner.shapes import PRESETS


def kernel_breakdown(model, arch: ModelArchitecture, batch: int, block_size: int) -> dict:
    """GPU kernel time of one model step (attention returns zeros) by kind, eager and replayed
    from a CUDA graph, and the time of the same GEMMs alone (torch.mm on [batch, in] x [in,
    out], every layer's four plus the LM head): how far the step's GEMMs are from cuBLAS on
    their own, and what runs between them."""
    plan = decode_plan(batch, 16, block_size)
    cache = PagedKVCache(arch.num_layers, 2, block_size, arch.num_kv_heads, arch.head_dim, torch.bfloat16, "cuda")
    zero = ZeroAttention(cache)
    eager = local_worker(model, zero)
    eager_kinds, eager_names = kernel_ms(lambda: eager.run(plan))
    graph_kinds, graph_names = kernel_ms(functools.partial(
        local_worker(model, zero, decode_graphs(model, zero, batch, 1, 1)).run, plan))
    h, d = arch.hidden_size, arch.head_dim
    qkv = (arch.num_attention_heads + 2 * arch.num_kv_heads) * d
    shapes = [(h, qkv), (arch.num_attention_heads * d, h), (h, 2 * arch.intermediate_size),
              (arch.intermediate_size, h)] * arch.num_layers + [(h, arch.vocab_size)]
    weights = {shape: torch.randn(*shape, dtype=torch.bfloat16, device="cuda") for shape in set(shapes)}
    inputs = {k: torch.randn(batch, k, dtype=torch.bfloat16, device="cuda") for k in {s[0] for s in shapes}}
    alone_ms = time_ms(lambda: [torch.mm(inputs[k], weights[k, n]) for k, n in shapes])
    gemm_flops = sum(2 * batch * k * n for k, n in shapes)
    top = lambda names: dict(sorted(names.items(), key=lambda kv: -kv[1])[:10])  # noqa: E731
    return {"batch": batch, "gemm_flops": gemm_flops, "eager_kinds_ms": eager_kinds, "graph_kinds_ms": graph_kinds,
            "gemms_alone_ms": alone_ms, "eager_top_kernels_ms": top(eager_names),
            "graph_top_kernels_ms": top(graph_names)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=PRESETS,
                        help="model shape preset (megatron_lamina/planner/shapes.py)")
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--model-batches", default="1,64,256,512,1024", help="batches for the model-worker step (b)")
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--out", default="bench_decode.json")
    parser.add_argument("--profile", action="store_true", help="print where the host time of a model step goes")
    parser.add_argument("--kernel-breakdown", default="", metavar="BATCHES",
                        help="e.g. 256,1024: GPU time of a model step by kernel kind (torch.profiler), against "
                             "the same GEMMs run alone through torch.mm")
    parser.add_argument("--cuda-graphs", default="0,1", help="run eager (0) and/or CUDA graphs (1)")
    parser.add_argument("--unfused", action="store_true",
                        help="the model runs eager SwiGLU and RoPE kernels, not the compiled ones (which "
                             "otherwise eager steps run too: their host cost shows in the eager figures)")
    args = parser.parse_args(argv)
    arch = PRESETS[args.shape].to_architecture()
    try:
        check_context(arch, [int(c) for c in args.contexts.split(",")], args.shape)
    except ValueError as e:
        parser.error(f"--contexts: {e}")
    if "LOCAL_RANK" in os.environ:
        tp_size = init_torchrun_tp()
    else:
        init_one_rank("nccl")
        tp_size = 1
    if tp_size > 1 and args.kernel_breakdown:
        parser.error("--kernel-breakdown is for one GPU")
    copy_bw, gemm_rate = ceilings()
    tp = dist.new_group(list(range(tp_size)))

    model = random_model(arch, tp, fused=not args.unfused)
    # The whole model's figures (this rank holds 1/tp of the matrices; the norms, replicated,
    # are counted tp times: a few hundred thousand parameters).
    counts = torch.tensor([sum(p.numel() for p in model.parameters()),
                           model.embedding.word_embeddings.weight.numel()], device="cuda")
    dist.all_reduce(counts)
    params, embedding = counts.tolist()
    # FLOPs of the step's matrix products: every weight but the embedding table (a lookup),
    # unless the LM head shares it.
    gemm_params = params - (0 if arch.tie_word_embeddings else embedding)
    if tp_size > 1:  # the TP group's bound: its GPUs' bandwidth and GEMM rate together
        copy_bw, gemm_rate = copy_bw * tp_size, gemm_rate * tp_size
    result = {"device": torch.cuda.get_device_name(), "tensor_parallel": tp_size, "shape": args.shape,
              "fused_elementwise": not args.unfused, "copy_TBps": copy_bw / 1e12,
              "gemm_TFLOPs": gemm_rate / 1e12, "parameters": params, "model_step": [], "decode": []}

    # (b) model-worker step: attention returns zeros at once
    zero = ZeroAttention(PagedKVCache(arch.num_layers, 2, args.block_size, arch.num_kv_heads // tp_size, arch.head_dim,
                                      torch.bfloat16, "cuda"))
    if args.profile:
        import cProfile
        import pstats

        plan = decode_plan(64, 16, args.block_size)
        eager = local_worker(model, zero)
        eager.run(plan)
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(3):
            eager.run(plan)
        torch.cuda.synchronize()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    breakdowns = [kernel_breakdown(model, arch, int(b), args.block_size)
                  for b in args.kernel_breakdown.split(",") if b]
    result["kernel_breakdown"] = breakdowns
    graph_modes = [bool(int(x)) for x in args.cuda_graphs.split(",")]
    for batch in map(int, args.model_batches.split(",")):
        plan = decode_plan(batch, 16, args.block_size)
        for graphs in graph_modes:  # o = 0 for attention; the throwaway cache lends the scratch block
            step = local_worker(model, zero, decode_graphs(model, zero, batch, 1, 1) if graphs else None)
            ms = time_ms(lambda plan=plan, step=step: step.run(plan))
            del step
            flops = 2 * gemm_params * batch
            result["model_step"].append({"batch": batch, "cuda_graphs": graphs, "ms": ms,
                                         "TFLOPs": flops / (ms / 1e3) / 1e12,
                                         "frac_gemm": flops / (ms / 1e3) / gemm_rate})

    # (c) colocated decode step with the real paged cache and kernel
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            kv = kv_bytes(arch, batch, context)
            if (kv + params * 2) / tp_size > 0.85 * torch.cuda.get_device_properties(0).total_memory:
                result["decode"].append({"batch": batch, "context": context, "skipped": "KV does not fit"})
                continue
            bound = roofline_s(arch, params, batch, context, copy_bw, gemm_rate)
            times = colocated_decode_ms(model, arch, batch, context, args.block_size, graph_modes)
            for graphs, ms in times.items():
                result["decode"].append({"batch": batch, "context": context, "cuda_graphs": graphs, "ms": ms,
                                         "tokens_per_s": batch / (ms / 1e3), "roofline_ms": bound * 1e3,
                                         "frac_roofline": bound / (ms / 1e3)})
    if dist.get_rank() == 0:  # every rank measured its own shard in lockstep; rank 0 reports
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"{result['device']}: copy {copy_bw / 1e12:.2f} TB/s, bf16 GEMM {gemm_rate / 1e12:.0f} TFLOP/s, "
              f"{params / 1e9:.2f} B parameters")
        print("(b) model-worker step (no attention)")
        print(f"{'batch':>6} {'graphs':>6} {'ms':>8} {'TFLOP/s':>8} {'% GEMM':>7}")
        for r in result["model_step"]:
            print(f"{r['batch']:>6} {r['cuda_graphs']!s:>6} {r['ms']:>8.2f} {r['TFLOPs']:>8.0f} "
                  f"{100 * r['frac_gemm']:>7.1f}")
        for b in breakdowns:
            print(f"model step at batch {b['batch']}: GPU kernel time by kind (one step; eager | CUDA graph)")
            for kind in sorted(b["eager_kinds_ms"], key=lambda k: -b["eager_kinds_ms"][k]):
                if kind not in ("span", "count"):
                    print(f"  {kind:<58} {b['eager_kinds_ms'][kind]:8.2f} | "
                          f"{b['graph_kinds_ms'].get(kind, 0.0):8.2f} ms")
            print(f"  {'first kernel start to last kernel end':<58} {b['eager_kinds_ms'].get('span', 0):8.2f} | "
                  f"{b['graph_kinds_ms'].get('span', 0):8.2f} ms")
            print(f"  {'kernels and copies (count)':<58} {b['eager_kinds_ms'].get('count', 0):8.0f} | "
                  f"{b['graph_kinds_ms'].get('count', 0):8.0f}")
            print(f"  {'the same GEMMs alone (torch.mm, back to back)':<58} {b['gemms_alone_ms']:8.2f} ms "
                  f"({b['gemm_flops'] / (b['gemms_alone_ms'] / 1e3) / gemm_rate:.0%} of the GEMM rate)")
            for mode in ("eager", "graph"):
                print(f"  top kernels, {mode}:")
                for name, ms in b[f"{mode}_top_kernels_ms"].items():
                    print(f"    {ms:8.2f} ms  {name[:100]}")
        print("(c) colocated decode step")
        print(f"{'batch':>6} {'ctx':>6} {'graphs':>6} {'ms':>8} {'tok/s':>8} {'roofline ms':>11} {'% roofline':>10}")
        for r in result["decode"]:
            if "skipped" in r:
                print(f"{r['batch']:>6} {r['context']:>6}  skipped: {r['skipped']}")
                continue
            print(f"{r['batch']:>6} {r['context']:>6} {r['cuda_graphs']!s:>6} {r['ms']:>8.2f} "
                  f"{r['tokens_per_s']:>8.0f} "
                  f"{r['roofline_ms']:>11.2f} {100 * r['frac_roofline']:>10.1f}")
    dist.destroy_process_group()
    return 0

