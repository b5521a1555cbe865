"""The recipes in deploy/ run exactly the commands `launch_commands` gives for their config.

`launch/nodes.py`'s `launch_commands` is the one source of every machine's command line
(`lamina serve --print-launch` prints it). The Kubernetes LeaderWorkerSet manifest and the
Slurm heterogeneous-job script write those lines out with the node rank as a variable of
their scheduler (LWS_WORKER_INDEX, SLURM_NODEID); here each recipe is parsed, the variable
replaced by every concrete rank it takes, and the result compared token by token with
`launch_commands("serve", config, cfg, endpoint)`, so an edited flag, a changed deployment
section without its recipe, or a miscounted machine fails. The GPUs each pod or component
asks for must be its node's `workers`, and the Kubernetes probes must reach the config's
`server.port` (`/ready`, `/health`).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from megatron_lamina.config import LaminaConfig, load_config
from megatron_lamina.launch.nodes import DEFAULT_RDZV_PORT, launch_commands

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
MANIFEST = DEPLOY / "k8s-leaderworkerset.yaml"
SLURM = DEPLOY / "slurm-hetjob.sh"
SLURM_CONFIG = "deploy/lamina-3node.yaml"   # as the script names it (run from the repository root)

LWS_ENDPOINT = f"$(LWS_LEADER_ADDRESS):{DEFAULT_RDZV_PORT}"
LWS_RANK = "$(LWS_WORKER_INDEX)"


# ------------------------------------------------------------------------------ kubernetes

def manifest() -> dict[str, dict]:
    """The manifest's documents by kind."""
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs) and set(kinds) == {"ConfigMap", "LeaderWorkerSet", "Service"}
    return kinds


def pod_container(template: dict) -> dict:
    (container,) = template["spec"]["containers"]
    return container


def config_path(template: dict, configmap: dict) -> str:
    """Where a pod template mounts the ConfigMap's config file."""
    volume = next(v["name"] for v in template["spec"]["volumes"]
                  if v.get("configMap", {}).get("name") == configmap["metadata"]["name"])
    mount = next(m["mountPath"] for m in pod_container(template)["volumeMounts"] if m["name"] == volume)
    (key,) = configmap["data"]
    return f"{mount}/{key}"


def port_number(container: dict, port) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def gpus(container: dict) -> int:
    resources = container["resources"]
    requested, limited = resources["requests"]["nvidia.com/gpu"], resources["limits"]["nvidia.com/gpu"]
    assert int(requested) == int(limited)   # Kubernetes requires it of extended resources
    return int(requested)


def test_the_leaderworkerset_runs_the_launch_commands():
    kinds = manifest()
    configmap, lws = kinds["ConfigMap"], kinds["LeaderWorkerSet"]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    (text,) = configmap["data"].values()
    cfg = LaminaConfig.from_dict(yaml.safe_load(text))
    nodes = cfg.deployment.nodes
    assert nodes[0].role == "model" and len(nodes) > 1 and all(n.role == "attention" for n in nodes[1:])
    group = lws["spec"]["leaderWorkerTemplate"]
    leader, worker = group["leaderTemplate"], group["workerTemplate"]
    assert group["size"] == cfg.nnodes

    path = config_path(leader, configmap)
    assert config_path(worker, configmap) == path, "leader and workers must read the same config"
    expected = [shlex.split(line) for line in launch_commands("serve", path, cfg, LWS_ENDPOINT)]
    # The leader is node rank 0; LWS numbers the workers 1..size-1 (LWS_WORKER_INDEX).
    assert pod_container(leader)["command"] == expected[0]
    worker_command = pod_container(worker)["command"]
    assert worker_command.count(LWS_RANK) == 1
    for rank in range(1, cfg.nnodes):
        assert [str(rank) if token == LWS_RANK else token for token in worker_command] == expected[rank]

    # One worker template: every attention node is the same size, and each pod asks for its GPUs.
    assert gpus(pod_container(leader)) == nodes[0].workers
    assert {node.workers for node in nodes[1:]} == {gpus(pod_container(worker))}


def test_the_leader_serves_http_with_probes_and_the_rendezvous_port():
    kinds = manifest()
    cfg = LaminaConfig.from_dict(yaml.safe_load(next(iter(kinds["ConfigMap"]["data"].values()))))
    assert cfg.server.host == "0.0.0.0", "the probes and the Service reach the pod's address, not loopback"
    leader = kinds["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
    container = pod_container(leader)
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/health"
    assert {port_number(container, p["port"]) for p in probes.values()} == {cfg.server.port}
    assert DEFAULT_RDZV_PORT in {p["containerPort"] for p in container["ports"]}
    service = kinds["Service"]
    assert service["spec"]["selector"].items() <= leader["metadata"]["labels"].items() | {
        ("leaderworkerset.sigs.k8s.io/name", kinds["LeaderWorkerSet"]["metadata"]["name"])}
    (port,) = service["spec"]["ports"]
    assert port_number(container, port["targetPort"]) == cfg.server.port


# ----------------------------------------------------------------------------------- slurm

def slurm_components(script: str) -> list[dict[str, str]]:
    """The `#SBATCH --key=value` options of each component (split at `#SBATCH hetjob`)."""
    components = [{}]
    for line in script.splitlines():
        if re.fullmatch(r"#SBATCH\s+hetjob\s*", line):
            components.append({})
        elif match := re.fullmatch(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?\s*", line):
            components[-1][match[1]] = match[2]
    return components


def slurm_steps(script: str) -> dict[int, list[str]]:
    """Het group -> the `lamina serve` command its srun step runs (as tokens)."""
    steps = {}
    for line in script.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        if not tokens or tokens[0] != "srun":
            continue
        (group,) = [int(t.split("=")[1]) for t in tokens if t.startswith("--het-group=")]
        assert tokens[-3:-1] == ["bash", "-c"] or tokens[-4:-2] == ["bash", "-c"], line
        command = shlex.split(next(t for t in tokens if "lamina serve" in t))
        steps[group] = command[1:] if command[0] == "exec" else command
    return steps


def node_rank(expression: str, node_id: int) -> int:
    """The rank a step's `--node-rank` expression gives on the node with SLURM_NODEID `node_id`."""
    match = re.fullmatch(r"\$SLURM_NODEID|\$\(\((\d+)\+SLURM_NODEID\)\)", expression)
    assert match, f"--node-rank {expression}: expected $SLURM_NODEID or $((OFFSET+SLURM_NODEID))"
    return int(match[1] or 0) + node_id


def test_the_slurm_hetjob_runs_the_launch_commands():
    script = SLURM.read_text()
    cfg = load_config(DEPLOY / Path(SLURM_CONFIG).name)
    expected = [shlex.split(line) for line in launch_commands("serve", SLURM_CONFIG, cfg, "$RDZV_ENDPOINT")]
    components, steps = slurm_components(script), slurm_steps(script)
    assert len(components) >= 2 and sorted(steps) == list(range(len(components))), "one srun step per component"
    placed = {}
    for group, options in enumerate(components):
        command = steps[group]
        at = command.index("--node-rank") + 1
        for node_id in range(int(options["nodes"])):
            rank = node_rank(command[at], node_id)
            assert rank not in placed, f"node rank {rank} started twice"
            placed[rank] = group
            assert command[:at] + [str(rank)] + command[at + 1:] == expected[rank]
            assert int(options["gpus-per-node"]) == cfg.node_workers(rank)
            assert int(options["ntasks-per-node"]) == 1   # one lamina agent per machine
    assert sorted(placed) == list(range(cfg.nnodes)) and placed[0] == 0, "the model node: rank 0, het group 0"
    # The rendezvous endpoint: the first host of het group 0 (the model node), the default port.
    assert re.search(r'RDZV_ENDPOINT="\$\(scontrol show hostnames "\$SLURM_JOB_NODELIST_HET_GROUP_0" \| head -n1\)'
                     rf':{DEFAULT_RDZV_PORT}"\nexport RDZV_ENDPOINT\n', script)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash to check the script's syntax")
def test_the_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SLURM)], check=True, timeout=30)
