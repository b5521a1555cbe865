"""Two GPUs for real (issue: disaggregated decode across devices).

    python tools/bench_two_gpu.py --out two_gpu.json

Part 1, correctness: the GPU tests (tests/test_gpu.py) with the model worker on GPU 0 and
the attention worker on GPU 1 over NCCL, greedy and seeded tokens and logits against
`transformers`, next to the colocated run.
Part 2, transport: round-trip time of the per-layer exchange, our transport
(`P2PChannel` on the model worker, `AttentionEndpoint` on the attention worker, the
attention itself replaced by o = q so only the transport is timed) against a bare NCCL
send/recv ping-pong moving the same bytes, for LLaMA-3-8B shapes (per token: q 8 KiB +
k, v 4 KiB out, o 8 KiB back, bf16) over the number of tokens in a micro-batch.
Not yet here: part 3 (8B-shaped decode throughput, disaggregated vs colocated data
parallel) and part 4 (planner prediction error); see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
# The repo root replaces tools/ on the path: tools/profile.py must not shadow the stdlib profile.
sys.path[0] = str(ROOT)

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _transport_rank(rank, port, token_counts, iters, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device("cuda", rank))
    from megatron_lamina.plan import MicroBatch, SequenceChunk
    from megatron_lamina.topology import Topology
    from megatron_lamina.transport.p2p import AttentionEndpoint, P2PChannel

    topo = Topology(tp_size=1, head_groups=1, request_shards=1, num_kv_heads=KV_HEADS, attention_workers=1)
    dev, dtype = torch.device("cuda", rank), torch.bfloat16
    rows = []
    for n in token_counts:
        mb = MicroBatch([SequenceChunk(0, 0, 0, [0] * n, [0], True)])
        q = torch.randn(n, HEADS, HEAD_DIM, dtype=dtype, device=dev)
        k = torch.randn(n, KV_HEADS, HEAD_DIM, dtype=dtype, device=dev)
        v = torch.randn_like(k)
        out_bytes, back_bytes = (q.numel() + 2 * k.numel()) * 2, q.numel() * 2
        ping = torch.empty(out_bytes // 2, dtype=dtype, device=dev)
        pong = torch.empty(back_bytes // 2, dtype=dtype, device=dev)
        # bare NCCL ping-pong with the same bytes each way
        bare, ours = [], []
        for i in range(iters + 5):
            dist.barrier()
            if rank == 0:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dist.send(ping, 1)
                dist.recv(pong, 1)
                end.record()
                end.synchronize()
                if i >= 5:
                    bare.append(start.elapsed_time(end) * 1e3)
            else:
                dist.recv(ping, 0)
                dist.send(pong, 0)
        channel = P2PChannel(topo.routes_from_tp(0), 0, HEADS // KV_HEADS) if rank == 0 else None
        endpoint = AttentionEndpoint(topo.routes_to_attention(1), 0, 0, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM,
                                     dtype, dev) if rank == 1 else None
        for i in range(iters + 5):
            dist.barrier()
            if rank == 0:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                o = channel.finish(channel.begin(0, mb, q, k, v))
                end.record()
                end.synchronize()
                if i == 0:
                    assert torch.equal(o, q), "the exchange must return what the attention side sent"
                if i >= 5:
                    ours.append(start.elapsed_time(end) * 1e3)
            else:
                rq, _, _ = endpoint.receive(mb)
                endpoint.reply(rq)  # o = q: only the transport is timed
                endpoint.drain()
        if rank == 0:
            rows.append({"tokens": n, "bytes_out": out_bytes, "bytes_back": back_bytes,
                         "nccl_pingpong_us": _median(bare), "ours_roundtrip_us": _median(ours),
                         "ours_GBps": (out_bytes + back_bytes) / (_median(ours) / 1e6) / 1e9})
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def transport(token_counts, iters) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_transport_rank, args=(r, port, token_counts, iters, results)) for r in range(2)]
    for p in procs:
        p.start()
    rows = results.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="two_gpu.json")
    parser.add_argument("--tokens", default="1,8,32,128,256,512,1024")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    assert torch.cuda.device_count() >= 2, "needs two GPUs"
    result = {"devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    if not args.skip_tests:
        t0 = time.monotonic()
        tests = subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider"],
                               cwd=ROOT, capture_output=True, text=True)
        result["correctness"] = {"returncode": tests.returncode, "summary": tests.stdout.strip().splitlines()[-1],
                                 "seconds": round(time.monotonic() - t0, 1)}
        print("part 1 (tests/test_gpu.py, incl. model worker on GPU 0 + attention worker on GPU 1 over NCCL):",
              result["correctness"]["summary"])
    rows = transport([int(t) for t in args.tokens.split(",")], args.iters)
    result["transport"] = rows
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'tokens':>6} {'out KiB':>8} {'back KiB':>8} {'NCCL ping-pong us':>18} {'ours us':>8} {'ours GB/s':>9}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['bytes_out'] / 1024:>8.0f} {r['bytes_back'] / 1024:>8.0f} "
              f"{r['nccl_pingpong_us']:>18.1f} {r['ours_roundtrip_us']:>8.1f} {r['ours_GBps']:>9.1f}")
    return 0 if result.get("correctness", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
