"""Several machines as one job: the launcher's flags, this machine's part, and every machine's command.

A deployment (`deployment.nodes` in the config) runs one `lamina serve|generate` per machine,
each with the same config and the torchrun flags Megatron users know:

    lamina serve --config C --nnodes N --node-rank R --rdzv-endpoint HOST:PORT

`add_node_arguments` adds those flags (and `--rdzv-timeout`, `--rdzv-id`) to the launchers and
to the rank programs, which accept them so that one argument list serves both (under torchrun,
the rank program reads its node rank from its own `--node-rank`, since torchrun's is ignored by
the c10d rendezvous). `node_launch` checks them against the config and returns this machine's
`NodeLaunch`: how many ranks it starts, its address on the route to the endpoint (given to torch
elastic as `local_addr`, since the host name may resolve to an address the others do not
reach), and whether it hosts the rendezvous store: node 0 always does, so the endpoint must be
one of node 0's addresses (its launcher serves the store until every other machine has left). `launch_commands` gives every machine's command line for a config: what `lamina serve
--print-launch` prints, what the planner prints and what the recipes in deploy/ must match.
"""

from __future__ import annotations

import argparse
import shlex
import socket
import time
from dataclasses import dataclass

from megatron_lamina.config import ConfigError

DEFAULT_RDZV_TIMEOUT_S = 600
DEFAULT_RDZV_PORT = 29500
DEFAULT_RDZV_ID = "lamina"
RESOLVE_WAIT_S = 60.0  # node 0: how long its endpoint's name may take to resolve


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several machines (deployment.nodes in the config)")
    group.add_argument("--nnodes", type=int, default=None, metavar="N",
                       help="machines in the job (default: len(deployment.nodes), 1 without it)")
    group.add_argument("--node-rank", type=int, default=None, metavar="R",
                       help="this machine's index in deployment.nodes (0: the model node)")
    group.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                       help="the rendezvous (torch elastic c10d): an address of node 0, "
                            f"port {DEFAULT_RDZV_PORT} if omitted")
    group.add_argument("--rdzv-timeout", type=float, default=DEFAULT_RDZV_TIMEOUT_S, metavar="SECONDS",
                       help=f"how long to wait for every machine to join (default {DEFAULT_RDZV_TIMEOUT_S})")
    group.add_argument("--rdzv-id", default=DEFAULT_RDZV_ID, metavar="ID",
                       help=f"the job's rendezvous id, the same on every machine (default {DEFAULT_RDZV_ID})")


@dataclass(frozen=True)
class NodeLaunch:
    nnodes: int
    node_rank: int
    nproc: int                 # ranks this machine starts
    endpoint: str = ""         # host:port of the rendezvous (several machines only)
    rdzv_id: str = DEFAULT_RDZV_ID
    rdzv_timeout_s: float = DEFAULT_RDZV_TIMEOUT_S
    address: str = "127.0.0.1"  # this machine's address on the route to the endpoint

    @property
    def several(self) -> bool:
        return self.nnodes > 1

    @property
    def hosts_store(self) -> bool:
        """Node 0's launcher serves the rendezvous store."""
        return self.several and self.node_rank == 0


def node_name(cfg, node_rank: int) -> str:
    """'node 1 (attention, 2 workers)'."""
    if not cfg.deployment.nodes:
        return f"node {node_rank}"
    node = cfg.deployment.nodes[node_rank]
    return f"node {node_rank} ({node.role}, {node.workers} worker{'s' * (node.workers != 1)})"


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep:
        return endpoint, DEFAULT_RDZV_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT with a port in 1..65535")
    return host.strip("[]"), int(port)


def node_rank_of(cfg, args, local_world_size: int | None = None) -> int:
    """This machine's node rank: --node-rank, or (under torchrun without it) the only node of
    the deployment with this many ranks. ConfigError when it cannot be told."""
    nnodes = cfg.nnodes
    if args.node_rank is not None:
        if not 0 <= args.node_rank < nnodes:
            listed = f"deployment.nodes lists {nnodes}" if cfg.deployment.nodes else "no deployment section: one machine"
            raise ConfigError(f"--node-rank {args.node_rank}: must be in 0..{nnodes - 1} ({listed})")
        return args.node_rank
    if nnodes == 1:
        return 0
    if local_world_size is not None:
        fits = [i for i, node in enumerate(cfg.deployment.nodes) if node.workers == local_world_size]
        if len(fits) == 1:
            return fits[0]
    raise ConfigError(f"deployment.nodes lists {nnodes} machines: give each its --node-rank R "
                      f"(under torchrun, after launcher/serve.py|generate.py too)")


def node_launch(cfg, args) -> NodeLaunch:
    """This machine's part of the job, from the launcher's flags; ConfigError on a mistake."""
    nnodes = cfg.nnodes
    if args.nnodes is not None and args.nnodes != nnodes:
        listed = f"deployment.nodes lists {nnodes} machine(s)" if cfg.deployment.nodes else \
            "the config has no deployment section (one machine)"
        raise ConfigError(f"--nnodes {args.nnodes}: {listed}; add one deployment.nodes entry per machine")
    node_rank = node_rank_of(cfg, args)
    if nnodes == 1:
        return NodeLaunch(1, 0, cfg.world_size)
    if not args.rdzv_endpoint:
        raise ConfigError(f"deployment.nodes lists {nnodes} machines: start each with --nnodes {nnodes} "
                          f"--node-rank R --rdzv-endpoint HOST:PORT (an address of node 0); "
                          f"--print-launch prints the commands")
    if not args.rdzv_timeout > 0:
        raise ConfigError(f"--rdzv-timeout {args.rdzv_timeout:g}: must be a number of seconds > 0")
    from megatron_lamina.placement import node_address

    host, port = split_endpoint(args.rdzv_endpoint)
    if node_rank == 0 and not owns_address(host, wait_s=RESOLVE_WAIT_S):
        raise ConfigError(f"--rdzv-endpoint {args.rdzv_endpoint}: node 0 hosts the rendezvous, so the endpoint "
                          f"must be an address of this machine (node 0); {host} is not")
    return NodeLaunch(nnodes, node_rank, cfg.node_workers(node_rank), f"{host}:{port}", args.rdzv_id,
                      args.rdzv_timeout, node_address(host))


def owns_address(host: str, wait_s: float = 0.0) -> bool:
    """True when `host` resolves to an address of this machine (loopback included). A name that
    does not resolve yet is retried for `wait_s` (a Kubernetes pod's own DNS record can appear
    seconds after the pod starts)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            address = socket.gethostbyname(host)
            break
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(1.0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, 0))
            return True
        except OSError:
            return False


def launch_commands(program: str, config_path: str, cfg, endpoint: str | None = None,
                    rdzv_id: str = DEFAULT_RDZV_ID) -> list[str]:
    """Every machine's command line, node rank order (one machine: the one command)."""
    base = shlex.join(["lamina", program, "--config", config_path])
    if cfg.nnodes == 1:
        return [base]
    # The endpoint is left as written: recipes give it as a variable ($(LWS_LEADER_ADDRESS):29500).
    endpoint = endpoint or f"NODE0_ADDRESS:{DEFAULT_RDZV_PORT}"
    extra = "" if rdzv_id == DEFAULT_RDZV_ID else f" --rdzv-id {shlex.quote(rdzv_id)}"
    return [f"{base} --nnodes {cfg.nnodes} --node-rank {r} --rdzv-endpoint {endpoint}{extra}"
            for r in range(cfg.nnodes)]
