"""What `lamina plan search` writes for a ranked search: the printed ranking, the
paper-style comparison of the recommended layout and the colocated baseline with the prefix
cache off and on, the plot of tokens per dollar against the attention:model ratio, and a
recommended layout as a config file (configs/ format) with a header that says where each
number came from.
"""

from __future__ import annotations

from pathlib import Path

from megatron_lamina.planner.cost_table import CostTable
from megatron_lamina.planner.deployment import Machine, deployment_nodes
from megatron_lamina.planner.layout import config_yaml
from megatron_lamina.planner.link import Link, describe_link
from megatron_lamina.planner.search import CacheRow, Candidate, PrefixCache, Slo
from megatron_lamina.planner.shapes import ModelShape


def sources(tables: dict[str, CostTable]) -> list[str]:
    return [f"{name}: {t.source}" for name, t in sorted(tables.items())]


def print_ranking(candidates: list[Candidate], slo: Slo, top: int) -> None:
    head = (f"{'#':>3}  {'layout':<40} {'$/h':>7} {'tok/s':>9} {'Mtok/$':>8} "
            f"{'TPOT p' + str(slo.percentile):>11} {'batch':>6} {'ok':>3}  note")
    print(head)
    print("-" * len(head))
    for i, c in enumerate(candidates[:top], 1):
        r = c.result
        tpot = r.tpot_s.get(f"p{slo.percentile}")
        print(f"{i:>3}  {c.layout.label:<40} {c.price_per_hour:>7.2f} {r.output_throughput:>9.0f} "
              f"{c.tokens_per_dollar / 1e6:>8.3f} {(tpot or 0) * 1e3:>9.1f}ms {r.mean_batch:>6.0f} "
              f"{'yes' if c.feasible else 'no':>3}  {'synthetic ' if c.synthetic else ''}{c.why_not}")


def print_cache_rows(rows: list[CacheRow], slo: Slo) -> None:
    """The recommended layout and the colocated baseline with the prefix cache off and on:
    the share of prompt tokens it serves, throughput, tokens per dollar, TTFT and TPOT; then
    the recommended layout's gain over the baseline in each cache mode."""
    head = (f"{'role':<20} {'layout':<40} {'cache':<18} {'hit':>6} {'tok/s':>9} {'Mtok/$':>8} "
            f"{'TTFT p50':>9} {'TPOT p' + str(slo.percentile):>10} {'ok':>3}")
    print(head)
    print("-" * len(head))
    for row in rows:
        c, r = row.candidate, row.candidate.result
        hit = "-" if r.prefix_hit_rate is None else f"{r.prefix_hit_rate * 100:.1f}%"
        tpot = r.tpot_s.get(f"p{slo.percentile}") or 0
        print(f"{row.role:<20} {c.layout.label:<40} {row.cache:<18} {hit:>6} {r.output_throughput:>9.0f} "
              f"{c.tokens_per_dollar / 1e6:>8.3f} {(r.ttft_s.get('p50') or 0):>8.2f}s {tpot * 1e3:>8.1f}ms "
              f"{'yes' if c.feasible else 'no':>3}")
    by_cache: dict[str, dict[str, Candidate]] = {}
    for row in rows:
        by_cache.setdefault(row.cache, {})[row.role] = row.candidate
    for cache, roles in by_cache.items():
        if len(roles) == 2:
            recommended, baseline = roles.values()
            gain = recommended.tokens_per_dollar / baseline.tokens_per_dollar - 1
            print(f"recommended vs colocated baseline, tokens per dollar, cache {cache}: {gain * 100:+.1f}%")


def plot_ratio(candidates: list[Candidate], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[tuple[str, str, float], float] = {}
    for c in candidates:
        if not c.feasible:
            continue
        kind = "colocated" if c.layout.colocated else f"+{c.layout.attention_device}"
        key = (c.layout.model_device, kind, c.layout.ratio)
        best[key] = max(best.get(key, 0.0), c.tokens_per_dollar)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model_device, kind in sorted({(m, k) for m, k, _ in best}):
        points = sorted((r, v) for (m, k, r), v in best.items() if (m, k) == (model_device, kind))
        xs, ys = [p[0] for p in points], [p[1] / 1e6 for p in points]
        label = f"{model_device} colocated" if kind == "colocated" else f"{model_device} model + {kind[1:]} attention"
        ax.plot(xs, ys, "o" if kind == "colocated" else "o-", label=label)
    ax.set_xlabel("attention workers per model worker")
    ax.set_ylabel("output tokens per dollar (millions)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_config(candidate: Candidate, path: Path, args, shape: ModelShape, tables, slo: Slo, what: str,
                 link: Link | None, machines: list[Machine], prefix: PrefixCache | None = None) -> None:
    """`prefix`: the prefix cache the search priced with (its host tier goes into the config)."""
    r = candidate.result
    header = [
        f"{what}, written by lamina plan for model {shape.name} on {Path(args.trace).name}",
        f"(requests {args.skip}..{args.skip + args.requests}, TPOT p{slo.percentile} <= {slo.tpot_s:g} s).",
        f"Predicted at saturation: {r.output_throughput:.0f} output tok/s, "
        f"{candidate.tokens_per_dollar / 1e6:.3f} M tokens per dollar at ${candidate.price_per_hour:.2f}/h, "
        f"TPOT p50 {r.tpot_s['p50'] * 1e3:.1f} ms / p90 {r.tpot_s['p90'] * 1e3:.1f} ms, mean batch {r.mean_batch:.0f}.",
        f"Devices: {candidate.layout.hardware} on {len(machines)} machine{'s' * (len(machines) != 1)}: "
        f"{'; '.join(f'node {i}: {m.describe()}' for i, m in enumerate(machines))}.",
        "Each machine's command: lamina serve --config THIS_FILE --print-launch.",
        f"Model-attention link: {describe_link(link)}.",
        f"KV cache: the planner estimated {r.num_blocks} blocks per cache; num_blocks auto measures it.",
        *([f"Prefix cache: priced on, {r.prefix_hit_rate * 100:.1f}% of prompt tokens served from it"
           f"{f' with {prefix.host_cache_gib:g} GiB of host tier per KV rank' if prefix.host_cache_gib else ''}."]
          if prefix is not None else []),
        *[f"Costs {s}" for s in sources(tables)],
        *[f"KV {t.kv_attention_source(candidate.layout.kv_cache_dtype)}" for _, t in sorted(tables.items())
          if candidate.layout.kv_cache_dtype != "auto"],
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_yaml(candidate.layout, args.checkpoint or f"checkpoints/{shape.name}", "bfloat16", header,
                                deployment_nodes(machines),
                                {"host_cache_gib": prefix.host_cache_gib} if prefix and prefix.host_cache_gib else None))
