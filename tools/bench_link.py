"""What a TCP link between the model node and the attention node does to the step time, on CPU.

Runs the same batch job (the default model and layout: 1 model worker + 2 attention workers,
gloo) three ways: on one machine (loopback), across two machines (network namespaces joined by
a bridge, megatron_lamina/bench/machines.py: the model node and an attention node of 2
workers), and across two machines with `--delay-us` of one-way delay added on each machine's
link (tc netem, where the kernel has it). Prints one row per way: wall time, tokens/s and
seconds per step (the batch's decode steps dominate: short prompts, long outputs).

    python tools/bench_link.py [--requests 16] [--max-tokens 48] [--delay-us 100] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from megatron_lamina.bench.machines import Machines

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "smollm2-135m-instruct"


def job_files(tmp: Path, requests: int, max_tokens: int) -> tuple[Path, Path, Path]:
    lines = "".join(json.dumps({"id": i, "prompt": f"Count from {i} to one hundred:", "max_tokens": max_tokens,
                                "temperature": 0, "ignore_eos": True}) + "\n" for i in range(requests))
    (tmp / "in.jsonl").write_text(lines)
    base = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    base["model"]["checkpoint"] = str(CHECKPOINT)
    base["scheduler"]["max_batch_size"] = requests
    (tmp / "one.yaml").write_text(yaml.safe_dump(base))
    two = dict(base, parallel={"attention_head_groups": 1},
               deployment={"nodes": [{"role": "model", "workers": 1}, {"role": "attention", "workers": 2}]})
    (tmp / "two.yaml").write_text(yaml.safe_dump(two))
    return tmp / "in.jsonl", tmp / "one.yaml", tmp / "two.yaml"


def seconds(log: str) -> tuple[int, float]:
    found = re.search(r"generated (\d+) tokens in ([\d.]+) s", log)
    if found is None:
        raise RuntimeError(f"the job did not finish:\n{log[-3000:]}")
    return int(found.group(1)), float(found.group(2))


def run_one(tmp: Path, job: Path, config: Path, out: str) -> tuple[int, float]:
    argv = [sys.executable, "-m", "megatron_lamina.cli", "generate", "--config", str(config), "--input", str(job),
            "--output", str(tmp / out), "--quiet"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=900)
    return seconds(done.stderr)


def run_two(tmp: Path, job: Path, config: Path, out: str, delay_us: float) -> tuple[int, float] | None:
    with Machines(2) as machines:
        if delay_us:
            for i in range(2):
                added = subprocess.run(["tc", "-n", machines.names[i], "qdisc", "add", "dev", "eth0", "root", "netem",
                                        "delay", f"{delay_us:g}us"], capture_output=True, text=True)
                if added.returncode:
                    print(f"netem unavailable here ({added.stderr.strip()}): no delayed row", file=sys.stderr)
                    return None
        argv = [sys.executable, "-m", "megatron_lamina.cli", "generate", "--config", str(config), "--input", str(job),
                "--output", str(tmp / out), "--quiet", "--nnodes", "2", "--rdzv-endpoint",
                f"{machines.addresses[0]}:29500"]
        logs = [tmp / f"{out}.node{i}.log" for i in range(2)]
        procs = [machines.run(i, [*argv, "--node-rank", str(i)], cwd=ROOT, stdout=open(logs[i], "w"),
                              stderr=subprocess.STDOUT) for i in (1, 0)]
        for proc in procs:
            proc.wait(timeout=900)
        return seconds(logs[0].read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--delay-us", type=float, default=100.0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-link-") as name:
        tmp = Path(name)
        job, one, two = job_files(tmp, args.requests, args.max_tokens)
        for r in range(args.repeat):  # interleaved, so a noisy moment hits every way alike
            rows.append(("one machine (loopback)", run_one(tmp, job, one, f"one{r}.jsonl")))
            rows.append(("two machines (veth, TCP)", run_two(tmp, job, two, f"two{r}.jsonl", 0.0)))
            rows.append((f"two machines + {args.delay_us:g} us each way", run_two(tmp, job, two, f"d{r}.jsonl",
                                                                                   args.delay_us)))
    steps = args.max_tokens + 1
    print(f"{args.requests} requests x {args.max_tokens} tokens, default model and layout, gloo, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| way | tokens | wall s | tokens/s | s per step |\n| --- | ---: | ---: | ---: | ---: |")
    for way, result in rows:
        if result is not None:
            tokens, wall = result
            print(f"| {way} | {tokens} | {wall:.2f} | {tokens / wall:.1f} | {wall / steps:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
