"""Which machine runs what: a planned layout's workers placed on machines, as the config's
`deployment.nodes` and one `lamina serve` command per machine (`lamina plan search` prints both).

A machine holds one kind of GPU (`gpus_per_node` of them), so the rules are:
  * one machine when everything fits on one kind: a colocated layout, or attention workers
    of the model workers' own device type that fit beside them (no deployment section);
  * otherwise node 0 is the model node with the TP ranks (tensor parallelism stays inside
    one machine: a TP size over the machine's GPUs is refused), and the attention workers
    are spread evenly, in rank order (request shards consecutive), over as few attention
    nodes as hold them. Even rather than filled: each attention node's network link carries
    the same share of the exchange, and equal nodes fit one LeaderWorkerSet worker template.
The commands come from `launch/nodes.py`'s `launch_commands`, the one source of every
machine's command line (also behind `lamina serve --print-launch` and the deploy/ recipes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from megatron_lamina.planner.devices import DeviceSpec
from megatron_lamina.planner.layout import Layout

DEFAULT_GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Machine:
    device: str
    gpus: int                   # GPUs one machine of this type has
    model_workers: int = 0      # the TP ranks (node 0 only)
    attention_workers: int = 0

    @property
    def workers(self) -> int:
        return self.model_workers + self.attention_workers

    @property
    def role(self) -> str:
        return "model" if self.model_workers else "attention"

    def describe(self) -> str:
        """'1 model worker (TP 1) + 2 attention workers on 3 of its 8 H100 GPUs'."""
        parts = []
        if self.model_workers:
            parts.append(f"{self.model_workers} model worker{'s' * (self.model_workers != 1)} "
                         f"(TP {self.model_workers})")
        if self.attention_workers:
            parts.append(f"{self.attention_workers} attention worker{'s' * (self.attention_workers != 1)}")
        return f"{' + '.join(parts)} on {self.workers} of its {self.gpus} {self.device} GPUs"


def gpus_per_node(device: str, specs: Mapping[str, DeviceSpec], override: Mapping[str, int],
                  default: int | None = None) -> int:
    """GPUs in one machine of `device`: `override[device]` (--gpus-per-node NAME=N), else
    `default` (a bare --gpus-per-node N), else the device description's `gpus_per_node`
    (prices.yaml), else DEFAULT_GPUS_PER_NODE."""
    spec = specs.get(device)
    for value in (override.get(device), default, spec.gpus_per_node if spec else None):
        if value is not None:
            return value
    return DEFAULT_GPUS_PER_NODE


def place(layout: Layout, gpus: Mapping[str, int]) -> list[Machine]:
    """The machines of `layout`, node-rank order; `gpus[device]`: GPUs per machine of that type."""
    model_gpus = gpus[layout.model_device]
    if layout.tp > model_gpus:
        raise ValueError(f"TP {layout.tp} does not fit one {layout.model_device} machine of {model_gpus} GPUs: "
                         f"tensor parallelism stays inside one machine (--gpus-per-node)")
    if layout.colocated:
        return [Machine(layout.model_device, model_gpus, layout.tp)]
    if layout.attention_device == layout.model_device and layout.num_devices <= model_gpus:
        return [Machine(layout.model_device, model_gpus, layout.tp, layout.attention_workers)]
    per_node = gpus[layout.attention_device]
    nodes = -(-layout.attention_workers // per_node)
    base, extra = divmod(layout.attention_workers, nodes)
    return [Machine(layout.model_device, model_gpus, layout.tp)] + [
        Machine(layout.attention_device, per_node, attention_workers=base + (i < extra)) for i in range(nodes)]


def deployment_nodes(machines: list[Machine]) -> list[dict]:
    """The config's `deployment.nodes` (empty for one machine: no deployment section)."""
    if len(machines) == 1:
        return []
    return [{"role": m.role, "workers": m.workers} for m in machines]


def deployment_text(machines: list[Machine], config_path: str, cfg, endpoint: str | None = None) -> str:
    """What `lamina plan search` prints for a planned config: the machines, the `deployment` section
    and each machine's command."""
    import yaml

    from megatron_lamina.launch.nodes import launch_commands, node_name

    lines = [f"deployment of {config_path}: {len(machines)} machine{'s' * (len(machines) != 1)}"]
    lines += [f"  node {rank}: {m.describe()}" for rank, m in enumerate(machines)]
    nodes = deployment_nodes(machines)
    if nodes:
        lines += ["", yaml.safe_dump({"deployment": {"nodes": nodes}}, sort_keys=False).rstrip()]
    commands = launch_commands("serve", config_path, cfg, endpoint)
    where = (" (NODE0_ADDRESS: an address of node 0 that every machine reaches)"
             if len(commands) > 1 and endpoint is None else "")
    lines += ["", f"commands, one per machine{where}:"]
    for rank, command in enumerate(commands):
        lines += [f"# {node_name(cfg, rank)}", command]
    return "\n".join(lines)
