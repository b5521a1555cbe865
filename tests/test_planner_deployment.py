"""The planner's deployment (planner/deployment.py) and link options (`lamina plan`).

A planned layout is placed on machines (one model node with the TP ranks, the attention
workers spread evenly over as few attention nodes of G GPUs as hold them, or one machine
when everything fits on one kind), the recommended config carries that `deployment.nodes`,
and the printed commands are `launch_commands`' for that config. The link options reach
the simulator: a slower link predicts a slower step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from megatron_lamina.config import LaminaConfig, load_config
from megatron_lamina.launch.nodes import launch_commands
from megatron_lamina.planner.deployment import (
    DEFAULT_GPUS_PER_NODE, Machine, deployment_nodes, deployment_text, gpus_per_node, place,
)
from megatron_lamina.planner.devices import DeviceSpec, load_prices
from megatron_lamina.planner.layout import Layout, config_yaml
from test_planner_tools import plan

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
MOONCAKE = TRACES / "mooncake_conversation_trace.jsonl"
AZURE_CONV = TRACES / "AzureLLMInferenceTrace_conv.csv"
needs_traces = pytest.mark.skipif(not (MOONCAKE.is_file() and AZURE_CONV.is_file()),
                                  reason=f"no request traces at {TRACES} (CI copies shared/ beside the clone)")


def planned_config(layout: Layout, machines: list[Machine]) -> LaminaConfig:
    text = config_yaml(layout, "ckpt", "bfloat16", [], deployment_nodes(machines))
    return LaminaConfig.from_dict(yaml.safe_load(text))


def test_a_known_plan_prints_its_deployment():
    """TP 2 on H100 + 12 H20 attention workers, 8 GPUs a machine: the model node, then two
    attention nodes of 6; the printed section parses to the config's nodes and the commands
    are launch_commands' for that config."""
    layout = Layout("H100", 2, "H20", 12, 4, 2, 64)
    machines = place(layout, {"H100": 8, "H20": 8})
    assert deployment_nodes(machines) == [{"role": "model", "workers": 2}, {"role": "attention", "workers": 6},
                                          {"role": "attention", "workers": 6}]
    cfg = planned_config(layout, machines)
    assert (cfg.nnodes, cfg.parallel.tensor_parallel, cfg.parallel.attention_workers) == (3, 2, 12)
    text = deployment_text(machines, "configs/plan.yaml", cfg, "10.0.0.1:29500")
    lines = text.splitlines()
    assert lines[:4] == ["deployment of configs/plan.yaml: 3 machines",
                         "  node 0: 2 model workers (TP 2) on 2 of its 8 H100 GPUs",
                         "  node 1: 6 attention workers on 6 of its 8 H20 GPUs",
                         "  node 2: 6 attention workers on 6 of its 8 H20 GPUs"]
    section = text[text.index("deployment:\n"):text.index("\n\ncommands")]
    assert yaml.safe_load(section) == {"deployment": {"nodes": deployment_nodes(machines)}}
    commands = [line for line in lines if line.startswith("lamina ")]
    assert commands == launch_commands("serve", "configs/plan.yaml", cfg, "10.0.0.1:29500")
    assert commands[2] == ("lamina serve --config configs/plan.yaml --nnodes 3 --node-rank 2 "
                           "--rdzv-endpoint 10.0.0.1:29500")


@pytest.mark.parametrize("layout, gpus, nodes", [
    # colocated, and attention workers of the model's own type that fit beside it: one machine
    (Layout("H100", 2, None, 0, 1, 1, 64), {"H100": 8}, []),
    (Layout("H100", 1, "H100", 4, 1, 2, 64), {"H100": 8}, []),
    # ... that do not fit: a model node and an attention node of the same type
    (Layout("H100", 4, "H100", 6, 1, 2, 64), {"H100": 8}, [("model", 4), ("attention", 6)]),
    # spread evenly, as few attention nodes as hold them
    (Layout("H100", 1, "H20", 9, 1, 2, 64), {"H100": 8, "H20": 8}, [("model", 1), ("attention", 5), ("attention", 4)]),
    (Layout("H100", 1, "H20", 3, 1, 2, 64), {"H100": 8, "H20": 1},
     [("model", 1), ("attention", 1), ("attention", 1), ("attention", 1)]),
], ids=["colocated", "same-type-fits", "same-type-overflows", "uneven", "one-gpu-nodes"])
def test_placement_rules(layout, gpus, nodes):
    machines = place(layout, gpus)
    assert [(n["role"], n["workers"]) for n in deployment_nodes(machines)] == nodes
    assert sum(m.workers for m in machines) == layout.num_devices
    cfg = planned_config(layout, machines)
    assert cfg.world_size == layout.num_devices and cfg.nnodes == max(1, len(nodes))
    if not nodes:
        assert launch_commands("serve", "c.yaml", cfg) == ["lamina serve --config c.yaml"]


def test_tp_stays_inside_one_machine():
    with pytest.raises(ValueError, match="TP 8 does not fit one H100 machine of 4 GPUs"):
        place(Layout("H100", 8, "H20", 2, 1, 2, 64), {"H100": 4, "H20": 8})


def test_gpus_per_node_comes_from_the_option_then_the_device_description():
    specs, _ = load_prices()
    specs = {**specs, "H20": DeviceSpec("H20", 4.63, 148, 96, 4.0, 450, gpus_per_node=4)}
    assert gpus_per_node("H20", specs, {}) == 4                      # the device description
    assert gpus_per_node("H100", specs, {}) == DEFAULT_GPUS_PER_NODE  # neither: 8
    assert gpus_per_node("H20", specs, {}, default=2) == 2            # --gpus-per-node 2
    assert gpus_per_node("H20", specs, {"H20": 6}, default=2) == 6    # --gpus-per-node H20=6


@needs_traces
def test_plan_search_prints_the_recommended_deployment(tmp_path, capsys):
    """Decode only on Mooncake conversations (long contexts) the H20-attention layout wins; on
    one-GPU H20 machines its two attention workers take two attention nodes."""
    config = tmp_path / "planned.yaml"
    code = plan([
        "search", "--model", "llama3-8b", "--synthetic", "--trace", str(MOONCAKE), "--requests", "60",
        "--max-input-len", "8000", "--slo-tpot", "0.2", "--tp", "1", "--attention-workers", "2",
        "--attention-devices", "H20", "--micro-batches", "2", "--batch-caps", "64,128", "--decode-only",
        "--gpus-per-node", "H20=1", "--rdzv-endpoint", "h100-0:29500", "--link", "nccl",
        "--link-latency-us", "40", "--out-dir", str(tmp_path / "plan"), "--config-out", str(config)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads((tmp_path / "plan" / "ranking.json").read_text())
    assert report["link"]["name"] == "nccl" and report["link"]["latency_us"] == 40
    assert report["gpus_per_node"] == {"H100": 8, "H20": 1}
    best = Layout(**report["recommended"]["layout"])
    machines = place(best, report["gpus_per_node"])
    assert len(machines) == 3, report["recommended"]["label"]
    cfg = load_config(config)
    assert [(n.role, n.workers) for n in cfg.deployment.nodes] == [("model", 1), ("attention", 1), ("attention", 1)]
    commands = [line for line in printed.splitlines() if line.startswith("lamina ")]
    assert commands == launch_commands("serve", str(config), cfg, "h100-0:29500")
    assert "link nccl: 400 Gb/s, 40 us per message" in printed


@needs_traces
def test_plan_simulate_charges_the_link(tmp_path, capsys):
    """The same config predicted over three links: each slower link gives a longer TPOT;
    `--link table` with an override is refused."""
    def tpot(*link):
        out = tmp_path / f"{'-'.join(link) or 'default'}.json"
        code = plan([
            "simulate", "--config", str(ROOT / "configs" / "gpu-disaggregated.yaml"), "--model", "llama3-8b",
            "--synthetic", "--trace", str(AZURE_CONV), "--requests", "30", "--kv-blocks", "20000",
            "--decode-only", *link, "--out", str(out)])
        assert code == 0
        report = json.loads(out.read_text())
        return report["tpot_s"]["p50"], report["link"]

    rdma, default_link = tpot()
    assert default_link["name"] == "rdma" and default_link["latency_us"] == 33.0
    nccl, _ = tpot("--link", "nccl")
    tcp, _ = tpot("--link", "tcp")
    slower, link = tpot("--link", "tcp", "--link-bandwidth-gbps", "10")
    assert link["bandwidth_gbps"] == 10 and "overridden" in link["source"]
    assert rdma < nccl < tcp < slower
    assert plan(["simulate", "--config", str(ROOT / "configs" / "gpu-disaggregated.yaml"),
                             "--model", "llama3-8b", "--synthetic", "--trace", str(AZURE_CONV), "--requests", "5",
                             "--link", "table", "--link-latency-us", "5"]) == 2
    assert "--link table keeps the cost tables' measured network curves" in capsys.readouterr().err
