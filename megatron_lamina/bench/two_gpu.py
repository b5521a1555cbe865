"""Two GPUs for real (issue: disaggregated decode across devices): the program of
tools/bench_two_gpu.py.

    python tools/bench_two_gpu.py --out two_gpu.json
    python tools/bench_two_gpu.py --skip-tests --stage-graphs   # model worker on stage graphs

Part 1, correctness: the GPU tests (tests/test_gpu.py) with the model worker on GPU 0 and
the attention worker on GPU 1 over NCCL, greedy and seeded tokens and logits against
`transformers`, next to the colocated run.
Part 2, transport: time per per-layer exchange, our transport (`P2PChannel` on the model
worker, `AttentionEndpoint` on the attention worker, each direction on its own process group
as the engine sets them up; the attention itself replaced by o = q so only the transport is
timed) against a bare NCCL send/recv ping-pong moving the same bytes, for LLaMA-3-8B shapes
(per token: q 8 KiB + k, v 4 KiB out, o 8 KiB back, bf16) over the number of tokens in a
micro-batch. Each sample is `--layers` exchanges in a row (as a step's layers follow each
other), wall time over both GPUs synchronised, divided by `--layers`.
Part 3, throughput: a LLaMA-3-8B-shaped model with random bf16 weights, decode steps at
batch x context, disaggregated (model worker on GPU 0, attention worker with the whole KV
cache on GPU 1, NCCL, micro-batches 1-4; the model worker eager, or with `--stage-graphs`
replaying its stages between attention calls from CUDA graphs, `StageGraphs`) against
colocated data parallel (each GPU a full colocated engine with half the requests, CUDA
graphs); tokens/s, time per output token,
the busy share of each GPU in the disaggregated run (model-only step time over the step,
attention kernel time inside the run over the step), and each side alone (the model with
attention replaced by zeros; the attention kernels of the step without transport).
Part 4, the planner's prediction: `planner/pipeline.py`'s step-time formula for n staggered
micro-batches, fed with the model and attention times measured alone (per layer and
micro-batch) and part 2's round trip at the micro-batch's size, against the measured step.
With `--q-first` (runtime.q_first, issue 16) parts 2 and 3 send q before k, v: in part 2 the
attention side takes q, then k, v, before replying; in part 3 the attention worker attends the
cached tokens while k, v travel and merges the new token's term (attention/lse_merge.py). Run
it once with and once without to decide whether q-first stays.
A rank that fails or hangs (`--hang-s`) prints its traceback or every thread's stack.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: part 1 runs its tests/test_gpu.py

import torch
import torch.distributed as dist

from megatron_lamina.bench.ranks import run_ranks
from megatron_lamina.bench.timing import median
from megatron_lamina.planner.shapes import PRESETS

SHAPE = PRESETS["llama3-8b"]  # parts 2 and 3: LLaMA-3-8B's heads and, in part 3, its whole shape


def _direction_groups():
    """The engine's two transport groups (topology.init_process_groups), same order on both ranks."""
    return dist.new_group([0, 1]), dist.new_group([0, 1])


def _transport_rank(token_counts, iters, layers, q_first):
    rank = int(os.environ["RANK"])  # run_ranks' torchrun environment, MASTER_ADDR/PORT too
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device("cuda", rank))
    from megatron_lamina.plan import MicroBatch, SequenceChunk
    from megatron_lamina.topology import Topology
    from megatron_lamina.transport.p2p import AttentionEndpoint, P2PChannel

    to_attention, to_model = _direction_groups()
    heads, kv_heads, head_dim = SHAPE.num_heads, SHAPE.num_kv_heads, SHAPE.head_dim
    topo = Topology(tp_size=1, head_groups=1, request_shards=1, num_kv_heads=kv_heads, attention_workers=1)
    dev, dtype = torch.device("cuda", rank), torch.bfloat16
    channel = P2PChannel(topo.routes_from_tp(0), 0, heads // kv_heads, False, to_attention, to_model, q_first)
    endpoint = AttentionEndpoint(topo.routes_to_attention(1), 0, 0, kv_heads, heads // kv_heads, head_dim,
                                 dtype, dev, False, to_attention, to_model, q_first)

    def receive_q(mb):  # the attention side's q (k, v taken too: the exchange is whole)
        if not q_first:
            return endpoint.receive(mb)[0]
        rq, posted = endpoint.receive_q(mb)
        endpoint.receive_kv(posted)
        return rq

    rows = []
    for n in token_counts:
        mb = MicroBatch([SequenceChunk(0, 0, 0, [0] * n, [0], True)])
        q = torch.randn(n, heads, head_dim, dtype=dtype, device=dev)
        k = torch.randn(n, kv_heads, head_dim, dtype=dtype, device=dev)
        v = torch.randn_like(k)
        out_bytes, back_bytes = (q.numel() + 2 * k.numel()) * 2, q.numel() * 2
        ping = torch.empty(out_bytes // 2, dtype=dtype, device=dev)
        pong = torch.empty(back_bytes // 2, dtype=dtype, device=dev)

        def bare():  # a bare NCCL ping-pong with the same bytes each way, `layers` times
            for _ in range(layers):
                if rank == 0:
                    dist.send(ping, 1)
                    dist.recv(pong, 1)
                else:
                    dist.recv(ping, 0)
                    dist.send(pong, 0)

        def ours():  # `layers` exchanges in a row, as one micro-batch of a step does
            for _ in range(layers):
                if rank == 0:
                    channel.finish(channel.begin(0, mb, q, k, v))
                else:
                    endpoint.reply(receive_q(mb))  # o = q: only the transport is timed
            if rank == 1:
                endpoint.drain()

        if rank == 0:
            o = channel.finish(channel.begin(0, mb, q, k, v))
            assert torch.equal(o, q), "the exchange must return what the attention side sent"
        else:
            endpoint.reply(receive_q(mb))
            endpoint.drain()
        times = {}
        for name, fn in (("bare", bare), ("ours", ours)):
            samples, host = [], []
            for i in range(iters + 2):
                dist.barrier()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()  # the host has issued everything (NCCL waits are on the GPU)
                torch.cuda.synchronize()
                if i >= 2:
                    samples.append((time.perf_counter() - t0) / layers * 1e6)
                    host.append((t1 - t0) / layers * 1e6)
            times[name], times[name + "_host"] = median(samples), median(host)
        if rank == 0:
            rows.append({"tokens": n, "bytes_out": out_bytes, "bytes_back": back_bytes,
                         "nccl_pingpong_us": times["bare"], "ours_roundtrip_us": times["ours"],
                         "ours_model_host_us": times["ours_host"],
                         "ours_GBps": (out_bytes + back_bytes) / (times["ours"] / 1e6) / 1e9})
    dist.destroy_process_group()
    return rows


def transport(token_counts, iters, layers, q_first=False) -> list[dict]:
    return run_ranks(_transport_rank, 2, token_counts, iters, layers, q_first, threads=None, hang_s=300, timeout=330)


def _trace_step(step, path: Path, log) -> None:
    """One more step under torch.profiler: the host-side table (what the host waits in) and a
    Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    log("profiled step, by self CPU time:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
    prof.export_chrome_trace(str(path))


class _TimedAttention:
    """The attention worker's backend, each call between two CUDA events (its busy time)."""

    def __init__(self, attend):
        self.attend, self.busy = attend, []

    def host_index(self, chunks):
        return self.attend.host_index(chunks)

    def _timed(self, fn, *args):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        end.record()
        self.busy.append((start, end))
        return out

    def __call__(self, layer, index, q, k, v):
        return self._timed(self.attend, layer, index, q, k, v)

    # q-first: the cached part and the merge, each timed (two intervals a call instead of one)
    def attend_cached(self, layer, index, q):
        return self._timed(self.attend.attend_cached, layer, index, q)

    def append_and_merge(self, layer, index, partial, q, k, v):
        return self._timed(self.attend.append_and_merge, layer, index, partial, q, k, v)


def _throughput_cases(cases, layers_only, trace_dir, stage_graphs, q_first):
    rank = int(os.environ["RANK"])  # run_ranks' torchrun environment, MASTER_ADDR/PORT too
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=dev)
    from megatron_lamina.bench.decode_step import decode_graphs, local_worker, random_cache, random_model
    from megatron_lamina.bench.plans import announced, blocks_for, decode_plan
    from megatron_lamina.bench.stand_ins import ZeroAttention
    from megatron_lamina.bench.timing import time_ms
    from megatron_lamina.worker.attention_worker import AttentionWorker
    from megatron_lamina.worker.model_worker import ModelWorker
    from megatron_lamina.worker.stage_graphs import StageGraphs
    from megatron_lamina.worker.token_feed import TokenFeed
    from megatron_lamina.worker.worker_factory import attention_backend
    from megatron_lamina.host_to_device import to_device
    from megatron_lamina.topology import Topology
    from megatron_lamina.transport.p2p import AttentionEndpoint, P2PChannel

    log = functools.partial(print, f"[rank {rank}]", flush=True)
    # Every group is created by both ranks in the same order. The model's TP group has one
    # rank (TP = 1 issues no collectives); gloo keeps NCCL out of it.
    own = [dist.new_group([r], backend="gloo") for r in range(2)][rank]
    to_attention, to_model = _direction_groups()
    arch = SHAPE.with_layers(layers_only).to_architecture() if layers_only else SHAPE.to_architecture()
    L, bs, dtype = arch.num_layers, 64, torch.bfloat16
    # The compiled elementwise kernels, as an engine with CUDA graphs builds its model.
    model = random_model(arch, own, dtype, dev)
    topo = Topology(tp_size=1, head_groups=1, request_shards=1, num_kv_heads=arch.num_kv_heads, attention_workers=1)
    log("model built")

    rows, graphs = [], None
    for batch, ctx, mode, micro in cases:
        log(f"case batch={batch} context={ctx} {mode} micro_batches={micro}")
        dist.barrier()
        blocks = batch * blocks_for(ctx + 1, bs)
        if mode == "colocated-dp":
            half = batch // 2
            cache = random_cache(arch, half * blocks_for(ctx + 1, bs) + 1, bs, arch.num_kv_heads, dtype, dev)
            attend = attention_backend(cache, dev)
            plan = decode_plan(half, ctx, bs)
            step = local_worker(model, attend, decode_graphs(model, attend, half, blocks_for(ctx + 1, bs),
                                                             scratch_block=half * blocks_for(ctx + 1, bs)))
            log("graphs captured")
            dist.barrier()
            ms = torch.tensor([time_ms(step.run, repeat=5, inputs=[(plan,)])], device=dev)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            row = {"batch": batch, "context": ctx, "mode": mode, "micro_batches": 1, "step_ms": ms.item()}
        else:
            if rank == 1 and model is not None:  # the attention GPU holds only the KV cache
                model = None
                torch.cuda.empty_cache()
            plan = decode_plan(batch, ctx, bs, micro_batches=micro)
            first = announced(plan)  # the attention worker learns the block tables from it
            per = -(-batch // micro)
            stats = torch.zeros(5, device=dev)
            if rank == 0:
                # The graphs capture only the stages (not the channel): captured before the
                # model alone is timed, replayed by both runs.
                if stage_graphs:
                    graphs = StageGraphs(model, per, micro)
                    graphs.capture()
                alone = local_worker(model, ZeroAttention(), stage_graphs=graphs)
                stats[1] = time_ms(alone.run, repeat=5, inputs=[(plan,)])  # the model alone
                channel = P2PChannel(topo.routes_from_tp(0), 0, arch.queries_per_kv_head, False, to_attention, to_model,
                                     q_first)
                step = ModelWorker(model, channel, TokenFeed(own, dev), stage_graphs=graphs)
                run = step.run
            else:
                cache = random_cache(arch, blocks, bs, arch.num_kv_heads, dtype, dev)
                paged = attention_backend(cache, dev)
                qkv = [(torch.empty(len(mb.chunks), arch.num_attention_heads, arch.head_dim, dtype=dtype, device=dev),
                        torch.empty(len(mb.chunks), arch.num_kv_heads, arch.head_dim, dtype=dtype, device=dev))
                       for mb in first.micro_batches]
                indices = to_device([paged.host_index(mb.chunks) for mb in first.micro_batches], dev)

                def attention_alone():  # the same kernels, no transport
                    for layer in range(L):
                        for index, (q, k) in zip(indices, qkv):
                            paged(layer, index, q, k, k)

                stats[2] = time_ms(attention_alone, repeat=5)
                timed = _TimedAttention(paged)
                endpoint = AttentionEndpoint(topo.routes_to_attention(1), 0, 0, arch.num_kv_heads,
                                             arch.queries_per_kv_head, arch.head_dim, dtype, dev, False,
                                             to_attention, to_model, q_first)
                step = AttentionWorker(endpoint, timed, L, dev)
                run = step.serve
            log("measured alone; pipelined run")
            dist.barrier()
            run(first)  # both ranks: one untimed step that carries the block tables
            # time_ms's warm-up + repeats; q-first records two intervals an exchange (cached, merge)
            timed_steps, calls = 3 + 5, L * len(plan.micro_batches) * (2 if q_first else 1)
            ms = time_ms(run, repeat=5, warmup=3, inputs=[(plan,)])
            torch.cuda.synchronize()
            if trace_dir:
                name = f"trace_rank{rank}_{batch}x{ctx}_mb{micro}.json"
                _trace_step(lambda: run(plan), Path(trace_dir) / name, log)
            if rank == 0:
                stats[0] = ms
            else:
                # the attention calls of the timed steps (not the first one, nor a traced one after)
                busy = timed.busy[-timed_steps * calls:] if not trace_dir else \
                    timed.busy[-(timed_steps + 1) * calls:-calls]
                stats[3] = sum(s.elapsed_time(e) for s, e in busy) / timed_steps
            dist.all_reduce(stats)
            step_ms, model_ms, attention_alone_ms, attention_busy_ms, _ = stats.tolist()
            row = {"batch": batch, "context": ctx, "mode": mode, "micro_batches": micro, "step_ms": step_ms,
                   "stage_graphs": stage_graphs, "q_first": q_first, "model_alone_ms": model_ms, "attention_alone_ms": attention_alone_ms,
                   "model_busy": model_ms / step_ms, "attention_busy": attention_busy_ms / step_ms}
            # Part 4 (`predict`): the planner's pipeline model fed with these costs per layer and
            # micro-batch, and the round trip of this message size from part 2.
            row["pipeline_inputs"] = {"layers": L, "M_ms": model_ms / (L * micro),
                                      "A_ms": attention_alone_ms / (L * micro)}
        row["tokens_per_s"] = batch / (row["step_ms"] / 1e3)
        row["tpot_ms"] = row["step_ms"]
        rows.append(row)
        step = run = cache = paged = attend = graphs = timed = None  # the closures hold the cache
        torch.cuda.empty_cache()
    dist.destroy_process_group()
    return rows


def throughput(cases, layers_only=0, hang_s=540, trace_dir=None, stage_graphs=False, q_first=False) -> list[dict]:
    return run_ranks(_throughput_cases, 2, cases, layers_only, trace_dir, stage_graphs, q_first, threads=None,
                     hang_s=hang_s, timeout=hang_s + 30)


def predict(rows: list[dict], transport_rows: list[dict]) -> None:
    """Part 4: the planner's pipeline formula (planner/pipeline.py) with the measured model and
    attention costs and the measured round trip, against the measured step."""
    from megatron_lamina.planner.cost_table import Curve
    from megatron_lamina.planner.pipeline import uniform_step_time

    tokens = [r["tokens"] for r in transport_rows]
    rtt = Curve(tokens, [r["ours_roundtrip_us"] / 1e3 for r in transport_rows])
    host = Curve(tokens, [r.get("ours_model_host_us", 0.0) / 1e3 for r in transport_rows])
    for r in rows:
        if r["mode"] != "disaggregated":
            continue
        p = r["pipeline_inputs"]
        n, per = r["micro_batches"], -(-r["batch"] // r["micro_batches"])
        p["N_ms"], p["H_ms"] = rtt(per), host(per)
        # The formula as the planner has it: the transport is a pure delay.
        r["predicted_step_ms"] = uniform_step_time(p["layers"], n, p["M_ms"], p["A_ms"], p["N_ms"])
        r["prediction_error"] = r["predicted_step_ms"] / r["step_ms"] - 1
        # Eager model workers are host-bound: the host time of posting an exchange (H, part 2)
        # occupies the model worker like its own layers do.
        r["predicted_host_step_ms"] = uniform_step_time(p["layers"], n, p["M_ms"] + p["H_ms"], p["A_ms"], p["N_ms"])
        r["prediction_host_error"] = r["predicted_host_step_ms"] / r["step_ms"] - 1


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
    parser.add_argument("--layers", type=int, default=32,
                        help="exchanges in a row per timed sample in part 2 (a step's layers)")
    parser.add_argument("--trace-dir", default=None,
                        help="profile one pipelined step per disaggregated case (table + Chrome trace here)")
    parser.add_argument("--hang-s", type=float, default=540, help="a rank stuck this long dumps its stacks and exits")
    parser.add_argument("--model-layers", type=int, default=0,
                        help="part 3 with this many layers instead of LLaMA-3-8B's 32 (a quick check)")
    parser.add_argument("--stage-graphs", action="store_true",
                        help="part 3: the disaggregated model worker replays its stages from CUDA graphs (StageGraphs)")
    parser.add_argument("--q-first", action="store_true",
                        help="parts 2 and 3: q sent before k, v (runtime.q_first), the attention side merging by LSE")
    args = parser.parse_args(argv)
    assert torch.cuda.device_count() >= 2, "needs two GPUs"
    result = {"devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    if not args.skip_tests:
        t0 = time.monotonic()
        tests = subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider"],
                               cwd=ROOT, capture_output=True, text=True)
        result["correctness"] = {"returncode": tests.returncode, "summary": tests.stdout.strip().splitlines()[-1],
                                 "seconds": round(time.monotonic() - t0, 1)}
        if tests.returncode:
            result["correctness"]["output"] = tests.stdout[-20000:]
            print(tests.stdout[-6000:])
        print("part 1 (tests/test_gpu.py, incl. model worker on GPU 0 + attention worker on GPU 1 over NCCL):",
              result["correctness"]["summary"])
    if not args.skip_transport:
        rows = transport([int(t) for t in args.tokens.split(",")], args.iters, args.layers, args.q_first)
        result["q_first"] = args.q_first
        result["transport"] = rows
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"{'tokens':>6} {'out KiB':>8} {'back KiB':>8} {'NCCL ping-pong us':>18} {'ours us':>8} "
              f"{'ours GB/s':>9} {'model host us':>13}")
        for r in rows:
            print(f"{r['tokens']:>6} {r['bytes_out'] / 1024:>8.0f} {r['bytes_back'] / 1024:>8.0f} "
                  f"{r['nccl_pingpong_us']:>18.1f} {r['ours_roundtrip_us']:>8.1f} {r['ours_GBps']:>9.1f} "
                  f"{r['ours_model_host_us']:>13.1f}")
    if args.throughput:
        shapes = [tuple(map(int, case.split("x"))) for case in args.throughput.split(",")]
        cases = [(b, c, "colocated-dp", 1) for b, c in shapes]  # first: GPU 1 drops its model after
        cases += [(b, c, "disaggregated", int(m)) for b, c in shapes for m in args.micro_batches.split(",")]
        result["throughput"] = throughput(cases, args.model_layers, args.hang_s, args.trace_dir, args.stage_graphs,
                                          args.q_first)
        if result.get("transport"):
            predict(result["throughput"], result["transport"])
        Path(args.out).write_text(json.dumps(result, indent=2))
        nan = float("nan")
        print("disaggregated model worker:", "stage CUDA graphs" if args.stage_graphs else "eager",
              "; q-first" if args.q_first else "")
        print(f"{'batch':>6} {'ctx':>6} {'mode':>14} {'mb':>3} {'step ms':>8} {'tok/s':>8} {'model busy':>10} "
              f"{'attn busy':>9} {'model alone':>11} {'attn alone':>10} {'predicted':>9} {'error':>6} "
              f"{'pred.+host':>10} {'error':>6}")
        for r in result["throughput"]:
            print(f"{r['batch']:>6} {r['context']:>6} {r['mode']:>14} {r['micro_batches']:>3} {r['step_ms']:>8.2f} "
                  f"{r['tokens_per_s']:>8.0f} {r.get('model_busy', nan):>10.2f} {r.get('attention_busy', nan):>9.2f} "
                  f"{r.get('model_alone_ms', nan):>11.2f} {r.get('attention_alone_ms', nan):>10.2f} "
                  f"{r.get('predicted_step_ms', nan):>9.2f} {r.get('prediction_error', nan):>6.1%} "
                  f"{r.get('predicted_host_step_ms', nan):>10.2f} {r.get('prediction_host_error', nan):>6.1%}")
    return 0 if result.get("correctness", {}).get("returncode", 0) == 0 else 1

