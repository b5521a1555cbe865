"""The cost table of one device type, measured for the planner (DESIGN.md section 8); the
measurements behind tools/profile_costs.py.

    # on a GPU machine: LLaMA-3-8B shapes, TP 1 and 2, bf16
    python tools/profile_costs.py --model llama3-8b --device cuda --dtype bfloat16 --tp 1,2 \\
        --device-name H100 --out out/costs-h100-llama3-8b.json
    # the model curves again with the model worker's stages from CUDA graphs, into that table
    python tools/profile_costs.py --model llama3-8b --device cuda --tp 1,2 --emulate-tp --parts model --graphs \
        --merge-into out/costs-h100-llama3-8b.json --out out/costs-h100-llama3-8b-graphs.json
    # on CPU, small and quick (the default): the tests' tiny shape
    python tools/profile_costs.py --out out/costs-cpu-tiny.json

Three measurements, all on the device this runs on, with our own code paths:
  model      `ModelWorker.run` of a `LlamaModel` with random weights of the given shape and
             TP size (this process is TP rank 0, the others are spawned; gloo on CPU, NCCL
             on CUDA; eager, no CUDA graphs), attention replaced by zeros, one decode
             micro-batch of B tokens, built with 1 and with 3 layers (--layers): per-layer
             time = (T(3) - T(1)) / 2, step overhead = T(1) - per-layer time (embedding,
             final norm, LM head, logits gather) plus the sampler on B rows
             With --emulate-tp, a TP size t > 1 is not spawned: this one process builds
             rank 0's shard at TP 1 (ModelShape.tp_shard: hidden size unchanged, query heads,
             KV heads, MLP intermediate and padded vocab / t: the GEMMs a TP rank runs),
             times it the same way, and ADDS the collectives it cannot run from the NVLink
             number in configs/planner/prices.yaml (--tp-link): per layer 2 ring all-reduces
             of tokens x hidden, per step the embedding all-reduce and the logits all-gather
             (synthetic.py's ring model). The table's source says so; meta["emulated_tp"]
             keeps the measured and the added parts separately. For models whose weights
             need TP > 1 (llama3-70b: --tp 2,4,8 --layers 1,3) on a single GPU.
             With --graphs (CUDA only; TP 1 or --emulate-tp), the model is run as the engine's
             disaggregated TP 1 model worker runs it: `ModelWorker(model, .., stage_graphs=
             StageGraphs(model, ..))`, the stages between attention calls replayed from CUDA graphs (the zeros
             attention channel still called between replays). Each decode batch B <= the graph
             cap (the grid's largest batch <= --graph-max-batch, the engine's
             scheduler.max_batch_size) gets its own StageGraphs holding only the bucket the
             engine would pad B to, captured by an untimed first run and freed after the point;
             larger batches are timed eager (the engine's stage graphs go up to its prefill
             budget in tokens: validate_planner.py passes --graph-max-batch up to there, so
             prefill-sized points are graphs as well). meta["graphs"] lists the graph and the
             eager points per TP size.
             An emulated TP > 1 shard's graphs hold no all-reduce (the datasheet figure is
             added instead), where the engine's TP > 1 graphs capture the NCCL all-reduces.
  attention  the kernel the engine runs on this device (--attention engine: attention/gpu.py's
             PagedAttention, Triton decode and Triton paged prefill, on CUDA; attention/reference.py
             on CPU) over a one-layer `PagedKVCache` holding all KV heads: B decode requests
             of context C (grid), and prefill chunks (n tokens after s cached ones) recorded
             by their query-key pairs. With --graphs the decode points are replayed from a
             CUDA graph (`graph_ms`: the kernel's device time, as the engine's whole-step
             decode graphs run it); the prefill points stay host-timed (the engine
             runs prefill attention eagerly between its stage graphs). With --fp8-kv the
             same points again over an e4m3 cache (`PagedKVCache(storage=FP8)`, the engine's
             kv_cache.dtype fp8_e4m3): the table's FP8 rows, which the planner prices FP8 KV by
  network    `torch.distributed` send/recv ping-pong between this process and a spawned one,
             one-way time (half the round trip) vs message size (NCCL between 2 GPUs when
             there are 2, else gloo on host memory)
Each point is the median of --repeats timed runs after --warmup untimed ones. Not measured:
the driver's scheduling and plan broadcast (part of a real step's overhead). The device name
(--device-name, default from the CUDA device or "CPU") is the key the planner looks up in
configs/planner/prices.yaml. Defaults are small so that a CPU run takes seconds; pass GPU-sized grids
on a GPU (--batches, --contexts, --prefill, --message-bytes).

--merge-into EXISTING.json re-measures only some parts (e.g. --parts model --graphs) and writes
EXISTING's table to --out with those parts replaced (model curves per measured TP size; the
others kept); shape, dtype and device must match, the source names both runs and
meta["merged_from"] keeps EXISTING's source, meta and replaced model curves.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import platform
import sys
import time

import torch

from megatron_lamina.bench.plans import decode_plan, paged_chunks
from megatron_lamina.bench.ranks import run_ranks
from megatron_lamina.bench.timing import graph_ms, wall_s
from megatron_lamina.fp8 import FP8
from megatron_lamina.planner.cost_table import CostTable, Curve, Grid, prefill_pairs
from megatron_lamina.planner.shapes import ModelShape, load_shape

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------- model

def _device_for(rank: int, device_type: str) -> torch.device:
    if device_type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _model_rank(shape_dict, dtype_name, device_type, layer_counts, batches, warmup, repeats, threads,
                sample_vocab=None, graph_cap=None):
    """One TP rank (run_ranks sets its RANK and WORLD_SIZE): {layers: {tokens: seconds}} for
    ModelWorker.run, plus the sampler."""
    import os

    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = _device_for(rank, device_type)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        return _measure_model(rank, world, device, dist.new_group(list(range(world))), shape_dict, dtype_name,
                              device_type, layer_counts, batches, warmup, repeats, sample_vocab, graph_cap)
    finally:
        dist.destroy_process_group()


def _measure_model(rank, world, device, tp_group, shape_dict, dtype_name, device_type, layer_counts, batches,
                   warmup, repeats, sample_vocab=None, graph_cap=None):
    """sample_vocab: the vocabulary the sampler sees (default the shape's; an emulated TP
    rank's shape holds a vocab shard, but a real rank samples the gathered logits).
    graph_cap: with CUDA graphs, the engine's max_batch_size: batches up to it replay the
    stages from a StageGraphs (one bucket per point), larger ones run eager; None: all eager."""
    import torch.distributed as dist

    from megatron_lamina.bench.stand_ins import ZeroAttention
    from megatron_lamina.worker.model_worker import ModelWorker
    from megatron_lamina.driver.sampling import sample_tokens
    from megatron_lamina.requests.sampling_params import SamplingParams
    from megatron_lamina.worker.token_feed import TokenFeed
    from megatron_lamina.model.llama import LlamaModel
    from megatron_lamina.transport.channel import LocalChannel

    shape, dtype = ModelShape.from_dict(shape_dict), DTYPES[dtype_name]
    padded_vocab = shape.padded_vocab(world)
    no_attention = LocalChannel(ZeroAttention())
    torch.manual_seed(rank)
    out: dict = {"run": {}, "sample": {}}
    context = min(128, shape.max_context - 1)
    for layers in layer_counts:
        model = LlamaModel(shape.with_layers(layers).to_architecture(), dtype, tp_group, padded_vocab,
                           fused_elementwise=graph_cap is not None).to(device)
        with torch.no_grad():  # on the device: a CPU draws an 8B shape's billions of values slowly
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        runner = ModelWorker(model, no_attention, TokenFeed(tp_group, device))

        def run(plan, runner=runner):
            runner.run(plan)
            if world > 1:
                dist.barrier(group=tp_group)

        out["run"][layers] = {b: wall_s(run, device, warmup, repeats, setup=lambda b=b: decode_plan(b, context))
                              for b in batches if graph_cap is None or b > graph_cap}
        if graph_cap is not None:
            out["graphs"] = _graph_points(batches, graph_cap)
            for b, bucket in out["graphs"]["buckets"].items():
                out["run"][layers][b] = _time_graphs(model, no_attention, tp_group, b, bucket, context, device,
                                                     warmup, repeats)
            out["run"][layers] = {b: out["run"][layers][b] for b in batches}
        del model, runner, run
        if device_type == "cuda":
            torch.cuda.empty_cache()
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    generator = greedy.make_generator(device)
    for b in batches:  # the engine's batched sampler, where the logits are (llm_engine.py)
        logits = torch.randn(b, sample_vocab or shape.vocab_size, device=device, dtype=dtype)
        out["sample"][b] = wall_s(lambda _, logits=logits, b=b: sample_tokens(logits, [greedy] * b, [generator] * b),
                                 device, warmup, repeats)
    return out


def _graph_points(batches: list[int], graph_cap: int) -> dict:
    """The graph batches, each with the bucket the engine pads it to (max_batch_size =
    graph_cap), and the eager ones (above the cap)."""
    from megatron_lamina.worker.stage_graphs import token_buckets

    sizes = token_buckets(graph_cap)
    return {"max_batch": graph_cap,
            "buckets": {b: next(s for s in sizes if s >= b) for b in batches if b <= graph_cap},
            "eager": [b for b in batches if b > graph_cap]}


def _time_graphs(model, channel, tp_group, batch: int, bucket: int, context: int, device, warmup: int,
                 repeats: int) -> float:
    """ModelWorker.run of a decode micro-batch of `batch` rows replayed from CUDA graphs:
    a StageGraphs whose only bucket is `bucket` (captured before timing), freed after timing
    so that one point's graphs and static tensors are held at a time."""
    import gc

    from megatron_lamina.worker.model_worker import ModelWorker
    from megatron_lamina.worker.stage_graphs import StageGraphs
    from megatron_lamina.worker.token_feed import TokenFeed

    graphs = StageGraphs(model, bucket, 1, sizes=[bucket])
    graphs.capture()
    runner = ModelWorker(model, channel, TokenFeed(tp_group, device), stage_graphs=graphs)
    plan = functools.partial(decode_plan, batch, context)
    if not graphs.can_run(plan()):
        raise RuntimeError(f"StageGraphs cannot run a decode batch of {batch}")
    seconds = wall_s(runner.run, device, warmup, repeats, setup=plan)
    if runner.graph_steps != warmup + repeats:
        raise RuntimeError(f"batch {batch}: the timed steps did not all replay bucket {bucket}'s stage graphs")
    del runner, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return seconds


def tp_collectives(shape: ModelShape, tp: int, dtype_bytes: int, link_gbs: float, tokens: float) -> tuple[float, float]:
    """(per layer, per step) seconds of the TP collectives a rank of TP `tp` runs for a decode
    micro-batch of `tokens` tokens, as synthetic.py models them: per layer 2 ring all-reduces
    of tokens x hidden (after the attention output projection and after the MLP); per step
    the embedding's all-reduce of tokens x hidden and the logits all-gather of tokens x
    padded vocab / tp from each rank. `link_gbs`: one direction of NVLink (prices.yaml)."""
    from megatron_lamina.planner.synthetic import ring_all_gather_s, ring_all_reduce_s

    activations = tokens * shape.hidden_size * dtype_bytes
    per_layer = 2 * ring_all_reduce_s(activations, tp, link_gbs)
    per_step = (ring_all_reduce_s(activations, tp, link_gbs)
                + ring_all_gather_s(tokens * shape.padded_vocab(tp) // tp * dtype_bytes, tp, link_gbs))
    return per_layer, per_step


def tp_link(args, name: str) -> tuple[str, float]:
    """The prices.yaml device whose NVLink bandwidth an emulated TP rank's collectives get."""
    from megatron_lamina.planner.devices import DEFAULT_PRICES, load_prices

    prices = args.prices or DEFAULT_PRICES
    specs, _ = load_prices(prices)
    key = args.tp_link or name
    if key not in specs:
        raise ValueError(f"--emulate-tp: device {key!r} is not in {prices} (devices: {', '.join(specs)}); "
                         "pass --tp-link DEVICE for the NVLink numbers to add the TP collectives from")
    return key, specs[key].nvlink_gbs


def profile_model(args, shape: ModelShape, name: str = "") -> tuple[dict[int, Curve], dict[int, Curve], dict, dict]:
    """Model curves per TP size, what --emulate-tp measured and added, and the points --graphs
    replayed from CUDA graphs (the last two for meta)."""
    layer_curves, overhead_curves, emulated, graphs = {}, {}, {}, {}
    low, high = args.layers
    graph_cap = None
    if args.graphs:
        eligible = [b for b in args.batches if b <= args.graph_max_batch]
        graph_cap = max(eligible) if eligible else None
        print(f"model: stage graphs for batches {eligible} (max_batch {graph_cap}), eager for "
              f"{[b for b in args.batches if b > args.graph_max_batch]}", flush=True)
    dtype_bytes = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    for tp in args.tp:
        if shape.num_kv_heads % tp:
            raise ValueError(f"--tp {tp} does not divide the model's {shape.num_kv_heads} KV heads")
        emulate = args.emulate_tp and tp > 1
        if emulate:
            built, world = shape.tp_shard(tp), 1
            print(f"model: TP {tp} emulated on one device (rank 0's shard: {built.num_heads} q heads, "
                  f"{built.num_kv_heads} KV heads, MLP {built.intermediate_size}, vocab {built.vocab_size}), "
                  f"layers {low} and {high}, batches {args.batches}", flush=True)
        else:
            built, world = shape, tp
            print(f"model: TP {tp}, layers {low} and {high}, batches {args.batches}", flush=True)
        m = run_ranks(_model_rank, world, built.to_dict(), args.dtype, args.device, [low, high], args.batches,
                      args.warmup, args.repeats, args.threads, shape.vocab_size, graph_cap, here=True, threads=None,
                      timeout=3600)
        if args.graphs:
            g = m.get("graphs") or {"max_batch": None, "buckets": {}, "eager": list(args.batches)}
            graphs[tp] = {"graph_batches": list(g["buckets"]), "buckets": list(g["buckets"].values()),
                          "eager_batches": g["eager"], "max_batch": g["max_batch"],
                          "engine_runs_this": tp == 1}
        per_layer = [max(0.0, (m["run"][high][b] - m["run"][low][b]) / (high - low)) for b in args.batches]
        overhead = [max(0.0, m["run"][low][b] - low * t) + m["sample"][b] for b, t in zip(args.batches, per_layer)]
        if emulate:
            link, gbs = tp_link(args, name)
            added = [tp_collectives(shape, tp, dtype_bytes, gbs, b) for b in args.batches]
            emulated[tp] = {
                "measured": (f"one rank's shard built at TP 1 on this device ({built.num_heads} query heads, "
                             f"{built.num_kv_heads} KV heads, MLP intermediate {built.intermediate_size}, "
                             f"LM head and embedding vocab {built.vocab_size}): its GEMMs, norms, RoPE, "
                             "embedding lookup, LM head shard and the sampler over the full vocabulary"),
                "added_from_datasheet": (f"TP collectives not run (no peers), added as rings over {link} NVLink "
                                         f"{gbs:g} GB/s one direction (configs/planner/prices.yaml) + "
                                         "10 us each: per layer 2 all-reduces of tokens x hidden; per step "
                                         "the embedding all-reduce and the logits all-gather"),
                "link_device": link, "nvlink_gbs": gbs,
                "measured_model_layer_s": per_layer, "measured_step_overhead_s": overhead,
                "added_per_layer_s": [a for a, _ in added], "added_per_step_s": [b for _, b in added],
            }
            per_layer = [t + a for t, (a, _) in zip(per_layer, added)]
            overhead = [t + b for t, (_, b) in zip(overhead, added)]
        xs = [float(b) for b in args.batches]
        layer_curves[tp], overhead_curves[tp] = Curve(xs, per_layer), Curve(xs, overhead)
    return layer_curves, overhead_curves, emulated, graphs


# --------------------------------------------------------------------------- attention

def attention_kernel(choice: str, device_type: str):
    """cache -> an attention backend (host_index, then a call per layer): "engine" is the
    worker factory's own choice for the device (`attention_backend`)."""
    if choice == "engine":
        from megatron_lamina.worker.worker_factory import attention_backend

        return functools.partial(attention_backend, device=torch.device(device_type))
    if choice == "gpu":
        from megatron_lamina.attention.gpu import PagedAttention

        return PagedAttention
    if choice == "reference":
        from megatron_lamina.attention.reference import ReferenceAttention

        return ReferenceAttention
    module, _, name = choice.partition(":")
    return getattr(importlib.import_module(module), name)


def profile_attention(args, shape: ModelShape, storage: torch.dtype | None = None) -> tuple[Grid, Curve]:
    """The decode grid and prefill curve of one layer's attention over a cache of `storage`
    (None: the model dtype; FP8: e4m3 with scales, the kernels dequantizing)."""
    from megatron_lamina.attention.kv_cache import PagedKVCache
    from megatron_lamina.host_to_device import to_device

    kernel = attention_kernel(args.attention, args.device)
    device, dtype, block = torch.device(args.device), DTYPES[args.dtype], 16
    heads, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim

    def cost(chunks_spec: list[tuple[int, int]]) -> float:
        """chunks_spec: (start, tokens) per request; one layer, all heads."""
        chunks = paged_chunks([(start, [0] * n) for start, n in chunks_spec], block)
        cache = PagedKVCache(1, sum(len(c.block_table) for c in chunks), block, kv, d, dtype, device, storage)
        tokens = sum(n for _, n in chunks_spec)
        q = torch.randn(tokens, heads, d, dtype=dtype, device=device)
        k = torch.randn(tokens, kv, d, dtype=dtype, device=device)
        v = torch.randn(tokens, kv, d, dtype=dtype, device=device)
        attend = kernel(cache)
        [index] = to_device([attend.host_index(chunks)], device)  # once per step in the engine
        if graphed and all(n == 1 for _, n in chunks_spec):
            return graph_ms(lambda: attend(0, index, q, k, v), [()], calls=10, repeat=args.repeats) / 1e3
        return wall_s(lambda _: attend(0, index, q, k, v), device, args.warmup, args.repeats)

    graphed = args.graphs and device.type == "cuda"

    batches = args.attention_batches or args.batches
    cache_dtype = str(storage or dtype).removeprefix("torch.")
    print(f"attention ({cache_dtype} cache): decode batches {batches} x contexts {args.contexts}", flush=True)
    decode = [[cost([(c - 1, 1)] * b) for c in args.contexts] for b in batches]
    print(f"attention ({cache_dtype} cache): prefill chunks {args.prefill}", flush=True)
    points = sorted({(prefill_pairs(n, s + n), s, n) for s, n in args.prefill})
    return (Grid([float(b) for b in batches], [float(c) for c in args.contexts], decode),
            Curve([float(p) for p, _, _ in points], [cost([(s, n)]) for _, s, n in points]))


# ----------------------------------------------------------------------------- network

def _network_rank(sizes, device_type, warmup, repeats):
    import os

    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    use_nccl = device_type == "cuda" and torch.cuda.device_count() >= 2
    device = _device_for(rank, device_type) if use_nccl else torch.device("cpu")
    dist.init_process_group("nccl" if use_nccl else "gloo", rank=rank, world_size=2)
    try:
        return _measure_network(rank, device, sizes, warmup, repeats, "nccl" if use_nccl else "gloo")
    finally:
        dist.destroy_process_group()


def _measure_network(rank, device, sizes, warmup, repeats, backend):
    import torch.distributed as dist

    out = {"backend": backend, "seconds": {}}
    peer = 1 - rank
    for size in sizes:
        buf = torch.empty(max(1, size // 4), dtype=torch.float32, device=device)

        def ping(_, buf=buf):
            if rank == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(buf, peer)
                dist.send(buf, peer)

        out["seconds"][size] = wall_s(ping, device, warmup, repeats) / 2
    return out


def profile_network(args) -> tuple[Curve, str]:
    print(f"network: message bytes {args.message_bytes}", flush=True)
    n = run_ranks(_network_rank, 2, args.message_bytes, args.device, args.warmup, args.repeats, here=True,
                  threads=None, timeout=600)
    sizes = sorted(args.message_bytes)
    return Curve([float(s) for s in sizes], [n["seconds"][s] for s in sizes]), n["backend"]


# -------------------------------------------------------------------------------- main

def device_name(args) -> str:
    if args.device_name:
        return args.device_name
    if args.device == "cuda":
        name = torch.cuda.get_device_name(0)
        for known in ("H200", "H100", "H20", "A100"):
            if known in name:
                return known
        return name
    return "CPU"


def _merge_base(path: str, shape: ModelShape, dtype: str, name: str) -> CostTable:
    """--merge-into: the existing table, which must describe the same model, dtype and device."""
    base = CostTable.load(path)
    if base.synthetic:
        raise ValueError(f"--merge-into {path}: a synthetic table (its datasheet numbers would be labelled "
                         "measured)")
    for what, have, want in (("shape", base.shape, shape), ("dtype", base.dtype, dtype), ("device", base.device, name)):
        if have != want:
            raise ValueError(f"--merge-into {path}: its {what} is {have!r}, this run's is {want!r}")
    return base


def measure_table(args, parts: set[str]) -> int:
    """Measure `parts` (model, attention, network) as the parsed `args` say, merge into
    --merge-into where given, and write the table to args.out: 0, or 2 with an `error:` line."""
    if args.threads:  # this process is rank 0 of every part, and measures attention alone
        torch.set_num_threads(args.threads)
    try:
        shape = load_shape(args.model)
        name = device_name(args)
        base = _merge_base(args.merge_into, shape, args.dtype, name) if args.merge_into else None
        started = time.time()
        model_layer = overhead = None
        emulated: dict = {}
        graphs: dict = {}
        if "model" in parts:
            model_layer, overhead, emulated, graphs = profile_model(args, shape, name)
        decode, prefill = profile_attention(args, shape) if "attention" in parts else (None, None)
        decode_fp8, prefill_fp8 = (profile_attention(args, shape, FP8) if "attention" in parts and args.fp8_kv
                                   else (None, None))
        network, backend = profile_network(args) if "network" in parts else (None, None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if base is None and None in (model_layer, decode, network):
        print("error: a cost table needs all three parts (--parts model,attention,network), "
              "or --merge-into a table that has the others", file=sys.stderr)
        return 2
    hardware = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or platform.machine()
    source = (f"measured on {hardware} ({args.device}, torch {torch.__version__}, host {platform.node()}, "
              f"{datetime.date.today().isoformat()})")
    if emulated:
        links = sorted({f"{e['link_device']} NVLink {e['nvlink_gbs']:g} GB/s" for e in emulated.values()})
        source += (f" (TP {','.join(map(str, sorted(emulated)))} emulated on one device: the rank's GEMMs "
                   f"measured, TP all-reduces and logits all-gather added from the {', '.join(links)} "
                   "datasheet number in prices.yaml, not measured)")
    if graphs:
        caps = sorted({g["max_batch"] for g in graphs.values() if g["max_batch"]})
        source += (f" (model worker stages replayed from CUDA graphs (StageGraphs) for decode batches up to "
                   f"{', '.join(map(str, caps)) or 'none'}, eager above"
                   + ("; TP > 1: an emulated shard's graphs, all-reduces added from the datasheet"
                      if any(tp > 1 for tp in graphs) else "")
                   + ("; decode attention replayed from a CUDA graph" if "attention" in parts else "") + ")")
    if args.graphs and "attention" in parts and not graphs:
        source += " (decode attention replayed from a CUDA graph)"
    if decode_fp8 is not None:
        source += " (attention also over an fp8_e4m3 KV cache: the FP8 rows)"
    graph_meta = {}
    if graphs:
        graph_meta = {"graphs": {
            "runner": "ModelWorker(model, stage_graphs=StageGraphs(model, bucket, 1, sizes=[bucket])), zeros attention channel called "
                      "between replays; one StageGraphs per batch point holding only the bucket the engine "
                      "pads it to (its max_batch_size = max_batch), captured by an untimed first run",
            "note": "TP > 1 figures: an emulated rank's shard replayed from graphs with no all-reduce in "
                    "them (the datasheet figure is added); the engine's TP > 1 graphs capture NCCL all-reduces",
            "tp": {str(tp): g for tp, g in graphs.items()}}}
    meta = {"attention": args.attention, "fp8_kv": decode_fp8 is not None,
            "network_backend": backend, "layers": args.layers,
            "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads or torch.get_num_threads(),
            "wall_s": round(time.time() - started, 1),
            **({"emulated_tp": {str(tp): e for tp, e in emulated.items()}} if emulated else {}), **graph_meta}
    if base is not None:
        kept = [part for part in ("model", "attention", "network") if part not in parts]
        replaced = sorted(model_layer or {})
        source += f"; {', '.join(kept) or 'nothing'} kept from {args.merge_into}: {base.source}"
        if "model" in parts:
            kept_tp = [tp for tp in base.model_layer if tp not in model_layer]
            if kept_tp:
                source += f" (model curves of TP {','.join(map(str, sorted(kept_tp)))} too)"
        else:
            kept_tp = sorted(base.model_layer)
        old_emulated = {tp: e for tp, e in base.meta.get("emulated_tp", {}).items() if int(tp) in kept_tp}
        if old_emulated or emulated:
            meta["emulated_tp"] = {**old_emulated, **meta.get("emulated_tp", {})}
        if "attention" not in parts:
            meta["attention"] = base.meta.get("attention")
        if "network" not in parts:
            meta["network_backend"] = base.meta.get("network_backend")
        meta["merged_from"] = {
            "path": str(args.merge_into), "source": base.source, "parts_kept": kept,
            "meta": {k: v for k, v in base.meta.items() if k != "merged_from"},
            "replaced_model_layer": {str(tp): base.model_layer[tp].to_dict() for tp in replaced
                                     if tp in base.model_layer},
            "replaced_step_overhead": {str(tp): base.step_overhead[tp].to_dict() for tp in replaced
                                       if tp in base.step_overhead}}
        model_layer = {**base.model_layer, **(model_layer or {})}
        overhead = {**base.step_overhead, **(overhead or {})}
        if decode is None:
            decode, prefill = base.attention_decode, base.attention_prefill
            decode_fp8, prefill_fp8 = base.attention_decode_fp8, base.attention_prefill_fp8
            meta["fp8_kv"] = base.meta.get("fp8_kv", False)
        if network is None:
            network = base.network
    table = CostTable(
        device=name,
        source=source,
        shape=shape, dtype=args.dtype, model_layer=model_layer, step_overhead=overhead,
        attention_decode=decode, attention_prefill=prefill, network=network, meta=meta,
        attention_decode_fp8=decode_fp8, attention_prefill_fp8=prefill_fp8)
    table.save(args.out)
    print(f"wrote {args.out} ({name}, {table.source})")
    return 0


# --------------------------------------------------------------------- command line

def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="shape preset (tiny, llama3-8b, ...) or checkpoint dir")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--device-name", default=None, help="the device's key in configs/planner/prices.yaml")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--tp", type=_ints, default=[1], help="TP sizes to measure, comma-separated")
    parser.add_argument("--emulate-tp", action="store_true",
                        help="measure TP > 1 on ONE device: build rank 0's shard of the model at TP 1 (query "
                             "heads, KV heads, MLP and vocab / TP), time it, and add the TP collectives from "
                             "the NVLink number in --prices (labelled in the table's source and meta)")
    parser.add_argument("--tp-link", default=None,
                        help="--emulate-tp: the prices.yaml device whose NVLink bandwidth the collectives get "
                             "(default: --device-name)")
    parser.add_argument("--prices", default=None, help="device datasheet numbers (default configs/planner/prices.yaml)")
    parser.add_argument("--layers", type=_ints, default=[1, 3], help="two layer counts to difference")
    parser.add_argument("--batches", type=_ints, default=[1, 4, 16, 64],
                        help="decode batch sizes (tokens) for the model, and for attention unless "
                             "--attention-batches")
    parser.add_argument("--attention-batches", type=_ints, default=None,
                        help="decode batch sizes for attention (default: --batches); the model's grid "
                             "must reach prefill-sized token counts, attention's only the batch cap")
    parser.add_argument("--contexts", type=_ints, default=[16, 64, 200], help="decode contexts for attention")
    parser.add_argument("--prefill", type=lambda t: [tuple(int(x) for x in p.split("+")) for p in t.split(",")],
                        default=[(0, 16), (0, 64), (64, 64), (0, 128)],
                        help="prefill chunks as CACHED+TOKENS, comma-separated")
    parser.add_argument("--message-bytes", type=_ints, default=[256, 4096, 65536, 1 << 20])
    parser.add_argument("--attention", default="engine",
                        help="engine (what the engine runs on this device), gpu, reference, or MODULE:CLASS "
                             "built from a PagedKVCache and called (layer, chunks, q, k, v)")
    parser.add_argument("--fp8-kv", action="store_true",
                        help="attention part: measure it over an fp8_e4m3 KV cache too (the table's FP8 rows, "
                             "which lamina plan prices kv_cache.dtype fp8_e4m3 by; without them it estimates)")
    parser.add_argument("--graphs", action="store_true",
                        help="model part on CUDA: replay the model worker's stages from CUDA graphs (StageGraphs, "
                             "as the engine's disaggregated TP 1 model worker does) for decode batches up to "
                             "--graph-max-batch, eager above; TP 1 or --emulate-tp")
    parser.add_argument("--graph-max-batch", type=int, default=1024,
                        help="--graphs: the largest decode batch replayed from graphs (the engine's "
                             "scheduler.max_batch_size); larger batches are timed eager")
    parser.add_argument("--parts", default="model,attention,network")
    parser.add_argument("--merge-into", default=None, metavar="EXISTING.json",
                        help="write EXISTING's cost table with the parts measured here replaced (model curves "
                             "per measured TP size), e.g. --parts model --graphs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (CPU)")
    parser.add_argument("--out", required=True, help="cost table JSON")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if len(args.layers) != 2 or not 0 < args.layers[0] < args.layers[1]:
        parser.error("--layers takes two increasing layer counts, e.g. 1,2")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    parts = set(args.parts.split(","))
    if args.graphs:
        if args.device != "cuda":
            parser.error("--graphs: CUDA graphs need a GPU (--device cuda)")
        if not {"model", "attention"} & parts:
            parser.error("--graphs applies to the model and attention parts (--parts model,attention,...)")
        if any(tp > 1 for tp in args.tp) and not args.emulate_tp:
            parser.error("--graphs measures a TP 1 model worker; measure TP > 1 with --emulate-tp "
                         "(one rank's shard built at TP 1)")
    return measure_table(args, parts)

