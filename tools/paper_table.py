"""The paper-style comparison (issue #6): homogeneous H100 vs H100 model workers + H20 or H200
attention workers, at equal cost, per model and trace, from the planner's search.

    # on CPU, from the H100 cost tables measured (8B) / TP-emulated (70B) by tools/profile_costs.py;
    # H20 and H200 come from datasheet numbers (--synthetic) and are labelled so
    python tools/paper_table.py --costs llama3-8b=out/costs-h100-llama3-8b.json \\
        --costs llama3-70b=out/costs-h100-llama3-70b.json --out-dir out/paper

For every model x trace it runs `tools/plan.py search` once (attention devices H100, H20,
H200; model workers H100) and reads its ranking.json. The search ranks layouts by output
tokens per dollar (throughput x 3600 / the layout's $/h) under the TPOT SLO, so comparing
tokens per dollar IS the equal-cost comparison: for the same dollars per hour a
configuration replicated to that budget serves throughput proportional to its tokens per
dollar. Per case:

  homogeneous H100   the best feasible layout with H100s only: colocated, or H100 model
                     workers + H100 attention workers
  + H20 / + H200     the best feasible layout with H100 model workers and H20 (H200)
                     attention workers
  gain               best heterogeneous tokens/$ / best homogeneous-H100 tokens/$ - 1
  ratio              the recommended layout's attention workers per model worker (and its
                     TP, micro-batches, batch cap)

Writes OUT_DIR/paper_table.md (and .json) and each search's output under
OUT_DIR/MODEL-TRACE/. Every cost source (measured, TP-emulated, synthetic) is repeated under
the table. The default is the paper's setting, --decode-only (prefill on other, unpriced
workers); --inline-prefill uses our engine's chunked prefill instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without pip install

TRACES = {"azure-conv": ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv",
          "mooncake-conv": ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"}
MODEL_TP = {"llama3-8b": "1,2", "llama3-70b": "2,4,8"}


def _plan():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_tool", ROOT / "tools" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best(ranking: list[dict], keep) -> dict | None:
    rows = [r for r in ranking if r["feasible"] and keep(r["layout"])]
    return max(rows, key=lambda r: r["tokens_per_dollar"]) if rows else None


def with_link_network(path: Path, out_path: Path) -> Path:
    """A copy of a measured cost table whose network curve is the model-to-attention link of
    configs/planner/prices.yaml (the one the synthetic H20/H200 tables use), so every attention
    device type is compared over the same link. A one-GPU profile can only time a host-memory
    gloo ping-pong, which would penalise the H100-attention layouts alone."""
    import yaml

    from megatron_lamina.planner.synthetic import MESSAGE_BYTES

    link = yaml.safe_load((ROOT / "configs" / "planner" / "prices.yaml").read_text())["interconnect"]
    table = json.loads(Path(path).read_text())
    seconds = [link["latency_us"] * 1e-6 + b / (link["bandwidth_gbs"] * 1e9) for b in MESSAGE_BYTES]
    table["network"] = {"x": [float(b) for b in MESSAGE_BYTES], "seconds": seconds}
    table["source"] += (f"; network replaced by the prices.yaml link ({link['bandwidth_gbs']} GB/s, "
                        f"{link['latency_us']} us, an assumption shared with the synthetic tables)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(table, indent=1) + "\n")
    return out_path


def summarize(report: dict) -> dict:
    ranking = report["ranking"]
    homo = best(ranking, lambda lay: lay["model_device"] == "H100" and lay["attention_device"] in (None, "H100"))
    out = {"homogeneous": homo, "sources": report["cost_sources"], "synthetic": report["synthetic"]}
    for device in ("H20", "H200"):
        het = best(ranking, lambda lay, d=device: lay["model_device"] == "H100" and lay["attention_device"] == d)
        out[device] = het
        out[f"gain_{device}"] = (het["tokens_per_dollar"] / homo["tokens_per_dollar"] - 1
                                 if het and homo else None)
    return out


def _cell(row: dict | None) -> str:
    if row is None:
        return "none feasible"
    lay = row["layout"]
    return (f"{row['hardware']} TP{lay['tp']} n{lay['micro_batches']} b{lay['max_batch_size']}: "
            f"{row['output_throughput_tok_s']:.0f} tok/s, {row['tokens_per_dollar'] / 1e6:.3f} Mtok/$")


def _gain(value) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"


def _ratio(row: dict | None) -> str:
    return "n/a" if row is None else f"{row['ratio']:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--costs", action="append", default=[], metavar="MODEL=JSON",
                        help="the H100 cost table of a model (repeat per model); models without one are skipped")
    parser.add_argument("--models", default="llama3-8b,llama3-70b")
    parser.add_argument("--traces", default="azure-conv,mooncake-conv",
                        help=f"comma-separated names ({', '.join(TRACES)}) or NAME=PATH")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--slo-tpot", type=float, default=0.05, help="TPOT SLO, seconds (p90)")
    parser.add_argument("--max-input-len", type=int, default=4096, help="clip prompts (model context 8192)")
    parser.add_argument("--max-output-len", type=int, default=1024, help="clip outputs")
    parser.add_argument("--attention-workers", default="1,2,4,8")
    parser.add_argument("--micro-batches", default="2,4")
    parser.add_argument("--batch-caps", default="32,64,128,256,512,1024")
    parser.add_argument("--max-devices", type=int, default=16)
    parser.add_argument("--tp", action="append", default=[], metavar="MODEL=SIZES",
                        help=f"TP sizes per model (default {MODEL_TP})")
    parser.add_argument("--inline-prefill", action="store_true",
                        help="our engine's inline chunked prefill (default: --decode-only, the paper's setting)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out-dir", default="out/paper")
    parser.add_argument("--network", choices=("link", "measured"), default="link",
                        help="link: the measured tables' network curve is replaced by prices.yaml's interconnect, "
                             "as the synthetic tables have it (default); measured: keep what profile_costs.py measured")
    args = parser.parse_args(argv)

    costs = dict(c.split("=", 1) for c in args.costs)
    if args.network == "link":
        costs = {m: str(with_link_network(Path(c), Path(args.out_dir) / f"costs-{m}-link.json"))
                 for m, c in costs.items()}
    tp_sizes = {**MODEL_TP, **dict(t.split("=", 1) for t in args.tp)}
    traces = {}
    for t in args.traces.split(","):
        name, _, path = t.partition("=")
        traces[name] = Path(path) if path else TRACES[name]
    out_dir = Path(args.out_dir)
    plan = _plan()
    rows = []
    for model in args.models.split(","):
        if model not in costs:
            print(f"skip {model}: no --costs {model}=JSON", file=sys.stderr)
            continue
        for trace_name, trace in traces.items():
            case_dir = out_dir / f"{model}-{trace_name}"
            argv_search = [
                "search", "--model", model, "--costs", costs[model], "--synthetic", "--trace", str(trace),
                "--requests", str(args.requests), "--slo-tpot", str(args.slo_tpot),
                "--max-input-len", str(args.max_input_len), "--max-output-len", str(args.max_output_len),
                "--model-devices", "H100", "--attention-devices", "H100,H20,H200", "--tp", tp_sizes[model],
                "--attention-workers", args.attention_workers, "--micro-batches", args.micro_batches,
                "--batch-caps", args.batch_caps, "--max-devices", str(args.max_devices), "--jobs", str(args.jobs),
                "--out-dir", str(case_dir), "--config-out", str(case_dir / "recommended.yaml"), "--top", "10",
                "--link", "table",  # the tables' network curves, as --network chose them above
                *([] if args.inline_prefill else ["--decode-only"])]
            print(f"== {model} on {trace_name}: tools/plan.py {' '.join(argv_search)}", flush=True)
            started = time.time()
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                code = plan.main(argv_search)
            (case_dir).mkdir(parents=True, exist_ok=True)
            (case_dir / "search.log").write_text(log.getvalue())
            if not (case_dir / "ranking.json").exists():
                print(f"   search failed (exit {code}); see {case_dir / 'search.log'}", file=sys.stderr)
                continue
            s = summarize(json.loads((case_dir / "ranking.json").read_text()))
            s.update(model=model, trace=trace_name, search_s=round(time.time() - started, 1), exit=code)
            rows.append(s)
            print(f"   homogeneous H100: {_cell(s['homogeneous'])}")
            for d in ("H20", "H200"):
                print(f"   H100 + {d}: {_cell(s[d])}; gain {_gain(s[f'gain_{d}'])}, ratio {_ratio(s[d])}")
            print(f"   ({s['search_s']} s)", flush=True)

    mode = "inline chunked prefill" if args.inline_prefill else "decode only (the paper's setting)"
    lines = [
        "# Heterogeneous attention offloading vs homogeneous H100, equal cost",
        "",
        f"Planner search (tools/plan.py search), TPOT p90 <= {args.slo_tpot * 1e3:g} ms, {mode}, first "
        f"{args.requests} requests of each trace (prompts clipped to {args.max_input_len}, outputs to "
        f"{args.max_output_len}), saturated. Equal cost = output tokens per dollar (throughput x 3600 / $/h); "
        "gain = best H100 + X attention tokens/$ over best homogeneous-H100 (colocated or H100 attention) "
        "tokens/$ - 1; ratio = attention workers per model worker of the best heterogeneous layout.",
        "",
        "| model | trace | homogeneous H100 | H100 + H20 | gain H20 | ratio H20 | H100 + H200 | gain H200 | ratio H200 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        lines.append(f"| {s['model']} | {s['trace']} | {_cell(s['homogeneous'])} | {_cell(s['H20'])} | "
                     f"{_gain(s['gain_H20'])} | {_ratio(s['H20'])} | {_cell(s['H200'])} | "
                     f"{_gain(s['gain_H200'])} | {_ratio(s['H200'])} |")
    lines += ["", "Cost sources (H20 and H200 attention workers: datasheet roofline, SYNTHETIC; H200 price is an "
              "assumption, configs/planner/prices.yaml):", ""]
    for src in sorted({f"{s['model']}: {line}" for s in rows for line in s["sources"]}):
        lines.append(f"* {src}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "paper_table.md").write_text("\n".join(lines) + "\n")
    (out_dir / "paper_table.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out_dir / 'paper_table.md'} and {out_dir / 'paper_table.json'}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
