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
Part 3 (NOT YET WORKING: its two runs on nvidia-h200-x2 printed nothing in 400-540 s and were
killed; the progress lines below were added afterwards to find where it stops), throughput: a LLaMA-3-8B-shaped model with random bf16 weights, decode steps at
batch x context, disaggregated (model worker on GPU 0, attention worker with the whole KV
cache on GPU 1, NCCL, micro-batches 1-4, eager) against colocated data parallel (each GPU a
full colocated engine with half the requests, CUDA graphs); tokens/s, time per output token,
and the busy share of each GPU in the disaggregated run (model-only step time over the
step, attention kernel time over the step).
Not yet here: part 4 (planner prediction error); see docs/BENCHMARKS.md.
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


def _throughput_rank(rank, port, cases, results):
    try:
        _throughput_cases(rank, port, cases, results)
    except BaseException:  # report instead of leaving the other rank waiting forever
        import traceback

        results.put(f"rank {rank} failed:\n{traceback.format_exc()}")
        os._exit(1)


def _throughput_cases(rank, port, cases, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=dev)
    print(f"[rank {rank}] process group up", flush=True)
    from tools.bench_decode import SHAPES, decode_plan, time_ms

    from megatron_lamina.architecture import ModelArchitecture
    from megatron_lamina.attention.gpu import PagedAttention
    from megatron_lamina.attention.kv_cache import PagedKVCache
    from megatron_lamina.engine.attention_runner import AttentionRunner
    from megatron_lamina.engine.cuda_graphs import DecodeGraphs
    from megatron_lamina.engine.model_runner import ModelRunner
    from megatron_lamina.model.llama import LlamaModel
    from megatron_lamina.plan import MicroBatch, StepPlan
    from megatron_lamina.topology import Topology
    from megatron_lamina.transport.channel import LocalChannel
    from megatron_lamina.transport.p2p import AttentionEndpoint, P2PChannel

    arch = ModelArchitecture(**SHAPES["llama3-8b"])
    bs, dtype = 64, torch.bfloat16
    own = dist.new_group([rank], use_local_synchronization=True)
    model = LlamaModel(arch, dtype, own, None, arch.vocab_size).to(dev)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    topo = Topology(tp_size=1, head_groups=1, request_shards=1, num_kv_heads=arch.num_kv_heads, attention_workers=1)
    print(f"[rank {rank}] model built", flush=True)  # part 3 hung before any case ended twice: say where

    def set_channel(channel):
        for layer in model.decoder.layers:
            layer.remote_attention.channel = channel

    def random_cache(batch, ctx):
        blocks = batch * -(-(ctx + 1) // bs)
        cache = PagedKVCache(arch.num_layers, blocks + 1, bs, arch.num_kv_heads, arch.head_dim, dtype, dev)
        for t in cache.k + cache.v:
            t.normal_()
        return cache, blocks

    rows = []
    for batch, ctx, mode, micro in cases:
        print(f"[rank {rank}] case batch={batch} context={ctx} {mode} micro_batches={micro}", flush=True)
        dist.barrier()
        if mode == "colocated-dp":
            half = batch // 2
            cache, blocks = random_cache(half, ctx)
            attend = PagedAttention(cache)
            set_channel(LocalChannel(attend))
            plan = decode_plan(half, ctx, bs)
            runner = ModelRunner(model, DecodeGraphs(model, attend, half, -(-(ctx + 1) // bs), scratch_block=blocks))
            runner.run(plan)
            dist.barrier()
            ms = torch.tensor([time_ms(lambda: runner.run(plan), repeat=5)], device=dev)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            row = {"batch": batch, "context": ctx, "mode": mode, "micro_batches": 1, "step_ms": ms.item()}
        else:
            if rank == 1 and model is not None:  # the attention GPU holds only the KV cache
                model = None
                torch.cuda.empty_cache()
            chunks = decode_plan(batch, ctx, bs).micro_batches[0].chunks
            per = -(-batch // micro)
            plan = StepPlan([MicroBatch(chunks[i:i + per]) for i in range(0, batch, per)])
            if rank == 0:
                set_channel(LocalChannel(lambda layer, c, q, k, v: torch.zeros_like(q)))
                model_only = time_ms(lambda: ModelRunner(model).run(plan), repeat=5)
                set_channel(P2PChannel(topo.routes_from_tp(0), 0, arch.queries_per_kv_head))
                runner = ModelRunner(model)
            else:
                cache, _ = random_cache(batch, ctx)
                paged = PagedAttention(cache)
                busy = []

                def timed_attend(layer, c, q, k, v):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    o = paged(layer, c, q, k, v)
                    end.record()
                    busy.append((start, end))
                    return o

                endpoint = AttentionEndpoint(topo.routes_to_attention(1), 0, 0, arch.num_kv_heads,
                                             arch.queries_per_kv_head, arch.head_dim, dtype, dev)
                runner = AttentionRunner(endpoint, timed_attend, arch.num_layers)
            dist.barrier()
            ms = time_ms(lambda: runner.run(plan), repeat=5)  # both ranks run 3 + 5 steps
            torch.cuda.synchronize()
            stats = torch.zeros(3, device=dev)
            if rank == 0:
                stats[0], stats[1] = ms, model_only
            else:
                stats[2] = sum(s.elapsed_time(e) for s, e in busy) / 8  # 8 steps ran
            dist.all_reduce(stats)
            step, model_ms, attention_ms = stats.tolist()
            row = {"batch": batch, "context": ctx, "mode": mode, "micro_batches": micro, "step_ms": step,
                   "model_busy": model_ms / step, "attention_busy": attention_ms / step}
        row["tokens_per_s"] = batch / (row["step_ms"] / 1e3)
        row["tpot_ms"] = row["step_ms"]
        rows.append(row)
        runner = cache = None
        torch.cuda.empty_cache()
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def throughput(cases) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_throughput_rank, args=(r, port, cases, results)) for r in range(2)]
    for p in procs:
        p.start()
    rows = results.get(timeout=480)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if isinstance(rows, str):
        raise RuntimeError(rows)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="two_gpu.json")
    parser.add_argument("--tokens", default="1,8,32,128,256,512,1024")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-transport", action="store_true")
    parser.add_argument("--throughput", default="256x1024,512x1024,128x4096",
                        help="batch x context cases for part 3 ('' to skip)")
    parser.add_argument("--micro-batches", default="1,2,4")
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
    if not args.skip_transport:
        rows = transport([int(t) for t in args.tokens.split(",")], args.iters)
        result["transport"] = rows
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"{'tokens':>6} {'out KiB':>8} {'back KiB':>8} {'NCCL ping-pong us':>18} {'ours us':>8} {'ours GB/s':>9}")
        for r in rows:
            print(f"{r['tokens']:>6} {r['bytes_out'] / 1024:>8.0f} {r['bytes_back'] / 1024:>8.0f} "
                  f"{r['nccl_pingpong_us']:>18.1f} {r['ours_roundtrip_us']:>8.1f} {r['ours_GBps']:>9.1f}")
    if args.throughput:
        shapes = [tuple(map(int, case.split("x"))) for case in args.throughput.split(",")]
        cases = [(b, c, "colocated-dp", 1) for b, c in shapes]  # first: GPU 1 drops its model after
        cases += [(b, c, "disaggregated", int(m)) for b, c in shapes for m in args.micro_batches.split(",")]
        result["throughput"] = throughput(cases)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"{'batch':>6} {'ctx':>6} {'mode':>14} {'mb':>3} {'step ms':>8} {'tok/s':>8} {'model busy':>10} {'attn busy':>9}")
        for r in result["throughput"]:
            print(f"{r['batch']:>6} {r['context']:>6} {r['mode']:>14} {r['micro_batches']:>3} {r['step_ms']:>8.2f} "
                  f"{r['tokens_per_s']:>8.0f} {r.get('model_busy', float('nan')):>10.2f} {r.get('attention_busy', float('nan')):>9.2f}")
    return 0 if result.get("correctness", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
