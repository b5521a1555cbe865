"""FP8 on one Hopper GPU against bf16: the paged decode kernel at 4K context (fraction of copy
bandwidth), the colocated decode step at LLaMA-3-8B's shape per mode (bf16, FP8 KV, FP8
weights, both), and LLaMA-3-70B's shape with FP8 weights and KV on the one card
(megatron_lamina/bench/fp8_speed.py says what each figure is).

    python tools/bench_fp8.py --out-dir $OUT     # ~3 min on an H200
    python tools/bench_fp8.py --phases kernel --out-dir $OUT   # the kernel's sweep alone, ~2 min
    python tools/bench_fp8.py --phases quant --out-dir $OUT    # the FP8 linear's quantization, seconds
    python tools/bench_fp8.py --phases profile --out-dir $OUT  # the server-shaped step by kernel kind

Prints markdown tables; writes fp8_speed.json into --out-dir.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from megatron_lamina.bench.fp8_speed import (KERNEL_AXES, KERNEL_COLUMNS, MODES, best_kernel_rows, decode_rows,
                                              kernel_rows, markdown, quant_rows)
from megatron_lamina.bench.ranks import init_one_rank
from megatron_lamina.bench.timing import ceilings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("out/fp8"))
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--kernel-batch", type=int, default=64)
    p.add_argument("--kernel-axes", default=",".join(name for name, _ in KERNEL_AXES),
                   help="the kernel sweep's axes, searched in this order from each cache's default (none: the defaults only)")
    p.add_argument("--decode-batches", default="128,256", help="8B decode step batches (bf16 KV of 256 x 4K "
                   "does not fit one H200: only the FP8 KV modes run there)")
    p.add_argument("--batch-70b", type=int, default=64)
    p.add_argument("--profile-shape", default="256x1152", help="profile phase: batch x context of the 8B decode "
                   "step profiled by kernel kind in bf16 and with FP8 weights + KV (default: the server's closed batch)")
    p.add_argument("--phases", default="kernel,decode,70b", help="comma-separated: kernel, quant, decode, 70b, profile")
    args = p.parse_args(argv)
    names, known = [name for name in args.kernel_axes.split(",") if name], [name for name, _ in KERNEL_AXES]
    if set(names) - set(known):
        p.error(f"--kernel-axes {args.kernel_axes}: allowed {', '.join(known)} (comma-separated; empty: the defaults)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    init_one_rank("nccl")
    copy_bw, gemm = ceilings()
    result = {"device": torch.cuda.get_device_name(), "copy_TBps": copy_bw / 1e12, "gemm_TFLOPs": gemm / 1e12}
    print(f"{result['device']}: copy {copy_bw / 1e12:.2f} TB/s, bf16 GEMM {gemm / 1e12:.0f} TFLOP/s", flush=True)
    phases = args.phases.split(",")
    if "kernel" in phases:
        axes = [axis for axis in KERNEL_AXES if axis[0] in names]
        result["kernel"] = kernel_rows(args.kernel_batch, args.context, copy_bw, axes=axes,
                                       on_row=lambda row: print(markdown([row], KERNEL_COLUMNS).splitlines()[-1],
                                                                flush=True))
        print(markdown(result["kernel"], KERNEL_COLUMNS), flush=True)
        result["kernel_best"] = best_kernel_rows(result["kernel"])
        for kv, row in result["kernel_best"].items():
            print(f"best {kv}: {row['variant']}, BLOCK_N {row['block_n']}, {row['warps']} warps, {row['stages']} stages, "
                  f"{row['splits']} splits: {row['ms']:.4f} ms, {row['of_copy_bandwidth']:.3f} of copy bandwidth, "
                  f"{row['speedup']:.2f}x the bf16 default; paged_decode(**{row['config']})", flush=True)
    if "quant" in phases:
        result["quant"] = quant_rows(copy_bw)
        print(markdown(result["quant"]), flush=True)
    if "decode" in phases:
        result["decode"] = []
        for batch in map(int, args.decode_batches.split(",")):
            # bf16 KV at 8B is 128 KiB a token: 256 x 4K is 128 GiB, more than one H200 holds beside
            # the weights; FP8 halves it.
            fits_bf16 = batch * args.context * 128 * 1024 < 100 * 2**30
            modes = MODES if fits_bf16 else [m for m in MODES if m[2] is not None]
            result["decode"] += decode_rows("llama3-8b", batch, args.context, copy_bw, gemm, modes)
        print(markdown(result["decode"]), flush=True)
    if "profile" in phases:
        batch, context = map(int, args.profile_shape.split("x"))
        result["profile"] = decode_rows("llama3-8b", batch, context, copy_bw, gemm, [MODES[0], MODES[-1]], kernels=True)
        for row in result["profile"]:
            print(f"{row['mode']} {batch} x {context}: {row['ms']} ms; by kind (ms): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in row.get("kernels", {}).get("kinds", {}).items()), flush=True)
            for name, ms in row.get("kernels", {}).get("top", {}).items():
                print(f"    {ms:8.3f} ms  {name[:120]}", flush=True)
    if "70b" in phases:
        result["70b"] = decode_rows("llama3-70b", args.batch_70b, args.context, copy_bw, gemm, [MODES[-1]])
        print(markdown(result["70b"]), flush=True)
    (args.out_dir / "fp8_speed.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
