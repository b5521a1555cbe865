"""Benchmark (a): paged decode attention vs torch SDPA on contiguous KV (GPU).

    python tools/bench_attention.py --out bench_attention.json

LLaMA-3-8B attention shapes (32 query / 8 KV heads of 128, bf16) over batch x context x
block size; the measurement is megatron_lamina/bench/attention_kernel.py. Prints a table
last; writes the full numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megatron_lamina.bench.attention_kernel import check_mixed_lengths, kernel_configs, measure
from megatron_lamina.bench.timing import copy_bandwidth
from megatron_lamina.planner.shapes import PRESETS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--block-sizes", default="16,64,256")
    parser.add_argument("--block-n", default="64", help="kernel tile sizes to try; the best is reported")
    parser.add_argument("--warps", default="4", help="num_warps values to try")
    parser.add_argument("--stages", default="3", help="num_stages values to try")
    parser.add_argument("--waves", default="4", help="programs per multiprocessor targets to try")
    parser.add_argument("--out", default="bench_attention.json")
    args = parser.parse_args(argv)
    shape = PRESETS["llama3-8b"]  # its attention: 32 query heads, 8 KV heads, head_dim 128
    heads, kv_heads, d, dtype = shape.num_heads, shape.num_kv_heads, shape.head_dim, torch.bfloat16
    bandwidth = copy_bandwidth()
    mixed_err = check_mixed_lengths(heads, kv_heads, d, dtype)
    print(f"mixed lengths / block sizes / splits: worst relative error {mixed_err:.1e}")
    assert mixed_err < 1e-2, mixed_err
    configs = kernel_configs(args.block_n, args.warps, args.stages, args.waves)
    rows = []
    for batch in map(int, args.batches.split(",")):
        for ctx in map(int, args.contexts.split(",")):
            for block_size in map(int, args.block_sizes.split(",")):
                rows.append(measure(batch, ctx, block_size, heads, kv_heads, d, dtype, configs, bandwidth))
                print(json.dumps(rows[-1]), flush=True)
    result = {"device": torch.cuda.get_device_name(), "copy_bandwidth_TBps": bandwidth / 1e12,
              "shapes": "LLaMA-3-8B attention: 32 q heads, 8 kv heads, head_dim 128, bf16",
              "mixed_lengths_worst_rel_err": mixed_err, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{result['device']}  copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'batch':>5} {'ctx':>5} {'bs':>4} {'config':>16} {'paged ms':>9} {'%bw':>5} {'eager':>6} "
          f"{'sdpa ms':>8} {'%bw':>5} {'x sdpa':>6} {'err':>8}")
    for r in rows:
        c = r["kernel_config"]
        config = f"{c['block_n']}/{c['num_warps']}w/{c['num_stages']}s/{c['waves']:g}"
        print(f"{r['batch']:>5} {r['context']:>5} {r['block_size']:>4} {config:>16} {r['paged_ms']:>9.3f} "
              f"{100 * r['paged_frac_copy_bw']:>5.1f} {r['paged_eager_ms']:>6.3f} {r['sdpa_ms']:>8.3f} "
              f"{100 * r['sdpa_frac_copy_bw']:>5.1f} {r['speedup_vs_sdpa']:>6.2f} {r['paged_rel_err']:>8.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
