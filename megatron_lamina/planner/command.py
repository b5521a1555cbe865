"""`lamina plan`: which layout serves a trace at the lowest cost (DESIGN.md section 8).

    # rank layouts for LLaMA-3-8B on a slice of the Azure conversation trace, TPOT p90 <= 50 ms
    lamina plan search --model llama3-8b --costs h100.json h20.json \\
        --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv --requests 1000 --slo-tpot 0.05

    # the same from datasheet numbers only (every number is then labelled synthetic)
    lamina plan search --model llama3-8b --synthetic --trace ... --slo-tpot 0.05

    # predict one config's throughput and latencies on a trace replay, to compare with
    # tools/bench_serving.py against the real server
    lamina plan simulate --config configs/gpu-colocated.yaml --model llama3-8b \\
        --costs h100.json --model-device H100 --trace ... --requests 200 --rate-scale 1

Cost tables come from tools/profile_costs.py (one JSON per device type, measured) or, with
--synthetic, from the datasheet numbers in configs/planner/prices.yaml for every device that has no
measured table. `search` prints the ranked table, writes the recommended config (and the
best colocated one, the equal-cost baseline) in configs/ format, a JSON of every evaluated
layout and a PNG of throughput per dollar against the attention:model ratio. docs/PLANNER.md
explains the simulator and its assumptions.

The model-attention network is a link model (megatron_lamina/planner/link.py): `--link rdma`
(the Lamina paper's host-bypassed RDMA, the default), `nccl`, `tcp`, or `table` (the cost
tables' own measured network curves), with `--link-bandwidth-gbps` / `--link-latency-us` to
override a preset. For the layout it recommends, `search` also prints the machines it runs
on, the config's `deployment.nodes` and one `lamina serve` command per machine
(`--gpus-per-node`, default the device description's or 8).

The engine's prefix cache is priced as the engine runs it, on by default
(`--no-prefix-caching` turns it off, `--host-cache-gib G` adds the host tier each KV-holding
rank would have, the config's `kv_cache.prefix_caching` and `host_cache_gib`): on a Mooncake
trace every layout's hits come from the trace's `hash_ids` and that layout's own KV pool plus
host tier, and `search` prints the recommended layout and the colocated baseline with the
cache off and on. A trace without `hash_ids` (Azure) shares nothing, and `--decode-only`
models no prefill for the cache to save: the cache is then off.

The KV cache dtype: `simulate` takes the config's `kv_cache.dtype` (or `--set
kv_cache.dtype=fp8_e4m3`), `search` tries the `--kv-cache-dtype` names (auto, fp8_e4m3 or
both). An FP8 cache holds twice the tokens per cache, and its attention is priced by the
table's FP8 rows, or, for a table without them, by an estimate that every report names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_lamina.fp8 import FP8_NAME
from megatron_lamina.planner.cost_table import CostTable
from megatron_lamina.planner.deployment import deployment_text, gpus_per_node, place
from megatron_lamina.planner.devices import DEFAULT_PRICES, load_prices
from megatron_lamina.planner.layout import Layout, host_blocks_per_cache, kv_blocks_per_cache
from megatron_lamina.planner.link import LINKS, TABLE, Link, choose_link, describe_link
from megatron_lamina.planner.report import plot_ratio, print_cache_rows, print_ranking, sources, write_config
from megatron_lamina.planner.search import Pricing, PrefixCache, SearchSpace, Slo, cache_rows, search
from megatron_lamina.planner.shapes import ModelShape, load_shape
from megatron_lamina.planner.simulator import simulate
from megatron_lamina.planner.synthetic import synthetic_cost_table
from megatron_lamina.planner.trace import read_trace, select


KV_CACHE_DTYPES = ("auto", FP8_NAME)  # the config's kv_cache.dtype values


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _names(text: str) -> tuple[str, ...]:
    return tuple(v for v in text.split(",") if v)


def _gpus_per_node(text: str) -> tuple[int | None, dict[str, int]]:
    """'8' (every device) or 'H100=8,H20=4' (per device), or both: (default, per device)."""
    default, per_device = None, {}
    for item in _names(text):
        name, sep, value = item.rpartition("=")
        if not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: expected N or DEVICE=N with N >= 1")
        if sep:
            per_device[name] = int(value)
        else:
            default = int(value)
    return default, per_device


def _kv_dtypes(text: str) -> tuple[str, ...]:
    """'auto', 'fp8_e4m3' or both, comma-separated: the KV cache dtypes `search` tries."""
    names = _names(text)
    wrong = [n for n in names if n not in KV_CACHE_DTYPES]
    if wrong or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed values are {', '.join(KV_CACHE_DTYPES)} "
                                         "(comma-separated)")
    return names


def kv_sources(tables: dict[str, CostTable], kv_dtypes) -> list[str]:
    """Where each table's attention times come from at each KV dtype (an FP8 estimate says so)."""
    return [table.kv_attention_source(kv) for kv in kv_dtypes if kv != "auto" for _, table in sorted(tables.items())]


def link_of(args) -> Link | None:
    return choose_link(args.link, args.link_bandwidth_gbps, args.link_latency_us)


def load_tables(args, shape: ModelShape, devices: set[str], tp_sizes: tuple[int, ...]) -> dict[str, CostTable]:
    specs, link = load_prices(args.prices)
    tables: dict[str, CostTable] = {}
    for path in args.costs or []:
        table = CostTable.load(path)
        if table.shape != shape:
            raise ValueError(f"{path}: profiled for model shape {table.shape.name} "
                             f"({table.shape.to_dict()}), not {shape.name}; profile this shape")
        tables[table.device] = table
    for name in sorted(devices - set(tables)):
        if not args.synthetic:
            raise ValueError(f"no cost table for device {name}: pass one with --costs (tools/profile_costs.py "
                             "writes them) or --synthetic for datasheet estimates")
        if name not in specs:
            raise ValueError(f"device {name} is not in {args.prices} (devices: {', '.join(specs)})")
        tables[name] = synthetic_cost_table(shape, specs[name], link, list(tp_sizes), 2)
    return tables


def load_slice(args):
    trace = read_trace(args.trace, limit=args.requests, skip=args.skip)
    return select(trace, rate_scale=getattr(args, "rate_scale", 1.0), poisson_rate=getattr(args, "rate", None),
                  seed=args.seed, max_input_len=args.max_input_len, max_output_len=args.max_output_len)


def cmd_search(args) -> int:
    shape = load_shape(args.model)
    specs, _ = load_prices(args.prices)
    link = link_of(args)
    default_gpus, per_device_gpus = args.gpus_per_node
    gpus = {name: gpus_per_node(name, specs, per_device_gpus, default_gpus)
            for name in {*args.model_devices, *args.attention_devices}}
    space = SearchSpace(model_devices=args.model_devices, attention_devices=args.attention_devices,
                        tp_sizes=args.tp, attention_workers=args.attention_workers,
                        micro_batches=args.micro_batches, batch_caps=args.batch_caps,
                        max_devices=args.max_devices, max_prefill_tokens=args.max_prefill_tokens,
                        block_size=args.block_size, kv_cache_dtypes=args.kv_cache_dtype, gpus_per_node=gpus)
    tables = load_tables(args, shape, set(args.model_devices) | set(args.attention_devices), args.tp)
    trace, clipping = load_slice(args)
    slo = Slo(args.slo_tpot, args.slo_percentile)
    prefix, prefix_note = prefix_cache_of(args, trace)
    for line in sources(tables):
        print(f"costs {line}")
    for line in kv_sources(tables, args.kv_cache_dtype):
        print(f"kv {line}")
    print(f"link {describe_link(link)}")
    print(f"prefix cache {prefix_note}")
    candidates = search(trace, shape, tables, specs, slo, space, args.max_model_len, args.jobs,
                        args.decode_only, link, prefix)
    if not candidates:
        print("error: no layout fits the model (do the weights fit on the model devices?)", file=sys.stderr)
        return 1
    print_ranking(candidates, slo, args.top)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best = candidates[0]
    colocated = next((c for c in candidates if c.feasible and c.layout.colocated), None)
    disaggregated = next((c for c in candidates if c.feasible and not c.layout.colocated), None)
    gain = (disaggregated.tokens_per_dollar / colocated.tokens_per_dollar - 1
            if colocated and disaggregated else None)
    compared = [(role, c.layout) for role, c in (("recommended", best if best.feasible else None),
                                                 ("colocated baseline", colocated))
                if c is not None and (role == "recommended" or c is not best)]
    rows = []
    if compared and not args.decode_only and any(r.hash_ids for r in trace):
        rows = cache_rows(Pricing(trace, shape, tables, specs, slo, args.max_model_len, False, link), compared,
                          args.host_cache_gib)
        print()
        print_cache_rows(rows, slo)
    report = {"model": shape.to_dict(), "trace": str(args.trace), "skip": args.skip, "requests": len(trace),
              "decode_only": args.decode_only,
              "clipped": vars(clipping), "slo": {"tpot_s": slo.tpot_s, "percentile": slo.percentile},
              "cost_sources": sources(tables), "synthetic": any(t.synthetic for t in tables.values()),
              "kv_cache_dtypes": list(args.kv_cache_dtype), "kv_sources": kv_sources(tables, args.kv_cache_dtype),
              "link": link.to_dict() if link is not None else TABLE, "gpus_per_node": gpus,
              "prefix_caching": prefix is not None,
              "host_cache_gib": prefix.host_cache_gib if prefix is not None else 0.0,
              "prefix_cache_comparison": [row.to_dict() for row in rows],
              "recommended": best.to_dict() if best.feasible else None,
              "best_colocated": colocated.to_dict() if colocated else None,
              "best_disaggregated": disaggregated.to_dict() if disaggregated else None,
              "disaggregated_gain_tokens_per_dollar": gain,
              "ranking": [c.to_dict() for c in candidates]}
    (out / "ranking.json").write_text(json.dumps(report, indent=1) + "\n")
    synthetic = " (SYNTHETIC costs)" if report["synthetic"] else ""
    mode = ", decode only" if args.decode_only else ""
    plot_ratio(candidates, out / "ratio.png",
               f"{shape.name}, {Path(args.trace).name} [{args.skip}:{args.skip + len(trace)}], "
               f"TPOT p{slo.percentile} <= {slo.tpot_s * 1e3:g} ms{mode}{synthetic}")
    print(f"\nwrote {out / 'ranking.json'} and {out / 'ratio.png'}")
    if not best.feasible:
        print("no layout meets the SLO; relax --slo-tpot or widen the search", file=sys.stderr)
        return 1
    config_out = Path(args.config_out or f"configs/plan-{shape.name}-{Path(args.trace).stem}.yaml")
    machines = place(best.layout, gpus)
    write_config(best, config_out, args, shape, tables, slo, "Recommended layout", link, machines, prefix)
    print(f"recommended: {best.layout.label} -> {config_out}")
    if colocated is not None and colocated is not best:
        baseline = config_out.with_name(config_out.stem + "-colocated.yaml")
        write_config(colocated, baseline, args, shape, tables, slo, "Best colocated layout (baseline)", link,
                     place(colocated.layout, gpus), prefix)
        print(f"best colocated: {colocated.layout.label} -> {baseline}")
    if gain is not None:
        print(f"best disaggregated vs best colocated, tokens per dollar: {gain * 100:+.1f}%{synthetic}")
    from megatron_lamina.config import load_config

    print("\n" + deployment_text(machines, str(config_out), load_config(config_out), args.rdzv_endpoint))
    return 0


def prefix_cache_of(args, trace) -> tuple[PrefixCache | None, str]:
    """The prefix cache the search prices every layout with (None: off), and why, in words."""
    if not args.prefix_caching:
        return None, "off (--no-prefix-caching)"
    if args.decode_only:
        return None, "off (--decode-only models no prefill for it to save)"
    if not any(r.hash_ids for r in trace):
        return None, "off (the trace has no hash_ids: no prompt shares a block)"
    host = f" + {args.host_cache_gib:g} GiB host tier per KV rank" if args.host_cache_gib else ""
    return PrefixCache(args.host_cache_gib), f"on: hits from the trace's hash_ids, each layout's KV pool{host}"


def _gib(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: host tier GiB must be >= 0")
    return value


# ----------------------------------------------------------------------------- simulate

def cmd_simulate(args) -> int:
    from megatron_lamina.config import load_config

    cfg = load_config(args.config, args.config_overrides)
    shape = load_shape(args.model or cfg.model.checkpoint)
    specs, _ = load_prices(args.prices)
    p, s = cfg.parallel, cfg.scheduler
    layout = Layout(args.model_device, p.tensor_parallel, None if cfg.colocated else args.attention_device,
                    p.attention_workers, p.attention_head_groups, s.micro_batches, s.max_batch_size,
                    s.max_prefill_tokens, cfg.kv_cache.block_size, cfg.kv_cache.dtype)
    devices = {args.model_device} | ({args.attention_device} if not cfg.colocated else set())
    tables = load_tables(args, shape, devices, (p.tensor_parallel,))
    if args.kv_blocks is not None:
        blocks = args.kv_blocks
    elif cfg.kv_cache.num_blocks != "auto":
        blocks = cfg.kv_cache.num_blocks
    else:
        blocks = kv_blocks_per_cache(layout, shape, specs, tables[args.model_device].dtype_bytes)
    trace, clipping = load_slice(args)
    link = link_of(args)
    # The engine's prefix cache as the config sets it (hits from a Mooncake trace's hash_ids);
    # decode_only models no prefill for it to save.
    prefix = cfg.kv_cache.prefix_caching and not args.decode_only
    host = host_blocks_per_cache(layout, shape, cfg.kv_cache.host_cache_gib,
                                 tables[args.model_device].dtype_bytes) if prefix else 0
    result = simulate(trace, layout, shape, tables[args.model_device],
                      None if cfg.colocated else tables[args.attention_device], blocks,
                      args.max_model_len, saturate=args.saturate, decode_only=args.decode_only, link=link,
                      prefix_caching=prefix, host_blocks=host)
    report = {"config": str(args.config), "model": shape.name, "trace": str(args.trace), "skip": args.skip,
              "requests": len(trace), "clipped": vars(clipping), "saturate": args.saturate,
              "decode_only": args.decode_only, "prefix_caching": prefix, "host_blocks": host,
              "cost_sources": sources(tables), "kv_sources": kv_sources(tables, [cfg.kv_cache.dtype]),
              "link": link.to_dict() if link is not None else TABLE, **result.to_dict()}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


# --------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None, prog: str = "lamina plan") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--costs", nargs="*", metavar="JSON", help="cost tables from tools/profile_costs.py")
    common.add_argument("--synthetic", action="store_true",
                        help="datasheet roofline tables for devices without a measured one (labelled synthetic)")
    common.add_argument("--prices", default=str(DEFAULT_PRICES), help="device prices and datasheet numbers")
    common.add_argument("--trace", required=True, help="Azure CSV or Mooncake JSONL (../shared/traces)")
    common.add_argument("--skip", type=int, default=0, help="start at this request of the trace")
    common.add_argument("--requests", type=int, default=1000, help="requests of the trace to use")
    common.add_argument("--max-input-len", type=int, default=None, help="clip prompt lengths")
    common.add_argument("--max-output-len", type=int, default=None, help="clip output lengths")
    common.add_argument("--max-model-len", type=int, default=None,
                        help="the model's context (default: the shape's); longer prompts are rejected")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--decode-only", action="store_true",
                        help="the paper's setting: prefill on other (unmodelled) workers, requests "
                             "arrive with their prompt's KV; default: our engine's inline chunked prefill")
    common.add_argument("--link", choices=(*LINKS, TABLE), default="rdma",
                        help="the model-attention network (planner/link.py): rdma (Lamina paper, host-bypassed, "
                             "33 us), nccl (66.6 us), tcp (an assumption), or table (the cost tables' network curves)")
    common.add_argument("--link-bandwidth-gbps", type=float, default=None, metavar="GBPS",
                        help="override the link's bandwidth, Gbit/s")
    common.add_argument("--link-latency-us", type=float, default=None, metavar="US",
                        help="override the link's latency per message, microseconds")

    s = sub.add_parser("search", parents=[common], help="rank layouts by throughput per dollar under a TPOT SLO")
    s.add_argument("--model", required=True, help="shape preset (llama3-8b, llama3-70b, ...) or checkpoint dir")
    s.add_argument("--checkpoint", default=None, help="model.checkpoint to write in the configs")
    s.add_argument("--slo-tpot", type=float, required=True, help="seconds per output token")
    s.add_argument("--slo-percentile", type=int, choices=(50, 90, 99), default=90)
    s.add_argument("--model-devices", type=_names, default=("H100",), help="comma-separated")
    s.add_argument("--attention-devices", type=_names, default=("H100", "H20", "H200"))
    s.add_argument("--tp", type=_ints, default=(1, 2, 4, 8))
    s.add_argument("--attention-workers", type=_ints, default=(1, 2, 3, 4, 6, 8))
    s.add_argument("--micro-batches", type=_ints, default=(1, 2, 3, 4))
    s.add_argument("--batch-caps", type=_ints, default=(16, 32, 64, 128, 256, 512, 1024, 2048))
    s.add_argument("--max-devices", type=int, default=16)
    s.add_argument("--max-prefill-tokens", type=int, default=4096)
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--kv-cache-dtype", type=_kv_dtypes, default=("auto",), metavar="auto|fp8_e4m3[,...]",
                   help="the KV cache dtypes to try (kv_cache.dtype; comma-separated: both are ranked)")
    s.add_argument("--jobs", type=int, default=1, help="simulate layouts in this many processes")
    s.add_argument("--top", type=int, default=20, help="rows of the printed ranking")
    s.add_argument("--out-dir", default="out/plan")
    s.add_argument("--config-out", default=None,
                   help="recommended config path (default configs/plan-MODEL-TRACE.yaml)")
    s.add_argument("--gpus-per-node", type=_gpus_per_node, default=(None, {}), metavar="N|DEVICE=N,...",
                   help="GPUs in one machine, for every device or per device (default: the device's "
                        "gpus_per_node in --prices, else 8); TP stays inside one machine")
    s.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="price every layout with the engine's prefix cache (kv_cache.prefix_caching; on by "
                        "default as in the engine; hits from a Mooncake trace's hash_ids)")
    s.add_argument("--host-cache-gib", type=_gib, default=0.0, metavar="GIB",
                   help="the prefix cache's host tier on each rank that holds KV (kv_cache.host_cache_gib)")
    s.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="node 0's address for the printed commands (default: NODE0_ADDRESS:29500)")
    s.set_defaults(run=cmd_search)

    m = sub.add_parser("simulate", parents=[common], help="predict one config on a trace replay")
    m.add_argument("--config", required=True)
    m.add_argument("--set", dest="config_overrides", action="append", default=[], metavar="KEY=VALUE")
    m.add_argument("--model", default=None, help="shape preset or checkpoint dir (default: the config's checkpoint)")
    m.add_argument("--model-device", default="H100", help="device type of the model workers")
    m.add_argument("--attention-device", default="H20", help="device type of the attention workers")
    m.add_argument("--kv-blocks", type=int, default=None,
                   help="blocks per KV cache (default: the config's num_blocks, or the planner's estimate)")
    m.add_argument("--rate-scale", type=float, default=1.0, help="replay arrivals this many times faster")
    m.add_argument("--rate", type=float, default=None, help="Poisson arrivals at this rate (req/s) instead")
    m.add_argument("--saturate", action="store_true", help="all requests waiting at t=0 (capacity)")
    m.add_argument("--out", default=None, help="write the prediction JSON here too")
    m.set_defaults(run=cmd_simulate)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

