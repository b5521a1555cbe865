"""Host work per decode step on the CPU, before and after issue 24: the sampler, the padded
block tables, the step plan through the control plane, and the whole step's host work (schedule,
plan, block tables and index) in a colocated and a disaggregated layout
(megatron_lamina/bench/host_step.py says what each column times).

    python tools/bench_host_step.py                 # the table recorded in docs/BENCHMARKS.md
    python tools/bench_host_step.py --repeats 20    # quicker, noisier
    python tools/bench_host_step.py --only whole --layout disaggregated   # one part's rows

Prints one markdown table, ms per step (medians on this host, one thread: wall time, the whole
step's in the thread's CPU time).
"""

from __future__ import annotations

import argparse

import torch

from megatron_lamina.bench.host_step import LAYOUTS, block_tables_ms, plan_ms, sampler_ms, whole_step_ms

SIZES = ((256, 1024), (256, 8192), (1024, 1024), (1024, 8192))  # (batch, context) of a whole step
PARTS = ["sampler", "tables", "plan", "whole"]  # the table's row groups, in order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=100, help="timed calls per figure (median)")
    parser.add_argument("--vocab", type=int, default=32, help="the sampler's vocabulary (tiny: the "
                        "per-row overhead is what is timed)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--only", choices=PARTS, nargs="+", default=PARTS,
                        help="the rows to run (default: all; while iterating on one part, that part's)")
    parser.add_argument("--layout", choices=list(LAYOUTS), nargs="+", default=list(LAYOUTS),
                        help="the whole step's layouts")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = ["| host work | size | before (ms) | after (ms) | note |", "|---|---|---:|---:|---|"]
    for batch in (256, 1024) if "sampler" in args.only else ():
        t = sampler_ms(batch, args.vocab, args.repeats)
        rows.append(f"| sampler, temperature 1.0 | {batch} rows x {args.vocab} | {t['before']:.3f} | "
                    f"{t['after']:.3f} | greedy {t['greedy']:.3f} |")
    for batch, context in ((256, 1024), (256, 4096), (1024, 1024), (1024, 8192)) if "tables" in args.only else ():
        t = block_tables_ms(batch, context, args.block_size, args.repeats)
        rows.append(f"| padded block tables | {batch} x {context // 1024}K | {t['before']:.3f} | {t['after']:.3f} | "
                    f"+ apply (no new block) {t['apply']:.3f} |")
    for batch in (256, 1024) if "plan" in args.only else ():
        t = plan_ms(batch, 1024, args.repeats)
        rows.append(f"| plan encode + decode | {batch} requests | {t['before']:.3f} | {t['after']:.3f} | "
                    "before: pickle |")
    for layout in args.layout if "whole" in args.only else ():
        after_1k = {}
        for batch, context in SIZES:
            before, after = (whole_step_ms(layout, batch, context, args.block_size, args.repeats, new)
                             for new in (False, True))
            after_1k.setdefault(batch, after["step"])
            flat = f"; 8K/1K {after['step'] / after_1k[batch]:.2f}" if context > 1024 else ""
            rows.append(f"| whole step, {layout} | {batch} x {context // 1024}K | {before['step']:.3f} | "
                        f"{after['step']:.3f} | schedule {after['schedule']:.3f} + plan {after['plan']:.3f} + "
                        f"tables/index {after['index']:.3f} (before {before['schedule']:.3f} + "
                        f"{before['plan']:.3f} + {before['index']:.3f}); after/before "
                        f"{after['step'] / before['step']:.2f}{flat} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
