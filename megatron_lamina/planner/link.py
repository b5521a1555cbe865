"""The network between the model node and the attention nodes, as the planner models it.

Every exchange of a disaggregated step is two messages per micro-batch and request shard
(q, k, v out; the attention output back), each costing the link's per-message latency plus
its bytes over the link's bandwidth (`Link.message_time`). The simulator (simulator.py's
`StepCostModel`) charges that for both directions; the synthetic cost tables
(synthetic.py) draw their `network` curve from the same formula.

Presets (`LINKS`, `lamina plan --link`): `rdma` is the Lamina paper's fully host-bypassed
stack (33.0 us end to end per message, section 6.3), the default; `nccl` the same network
through NCCL (66.6 us, the paper's figure for it); both at 400 Gb/s, one RDMA NIC per GPU,
the datacenter network the paper builds on (~10 % of NVLink's bandwidth). `tcp` is a machine
without RDMA (NCCL's or gloo's socket transport): an ASSUMPTION, not a measurement. Every
field can be overridden (`--link-bandwidth-gbps`, `--link-latency-us`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth_gbps: float   # Gbit/s, one direction, as NICs are sold
    latency_us: float       # per message, end to end
    source: str = ""

    def __post_init__(self):
        if not self.bandwidth_gbps > 0:
            raise ValueError(f"link {self.name}: bandwidth {self.bandwidth_gbps:g} Gb/s must be > 0 "
                             f"(--link-bandwidth-gbps)")
        if not self.latency_us >= 0:
            raise ValueError(f"link {self.name}: latency {self.latency_us:g} us must be >= 0 (--link-latency-us)")

    def message_time(self, nbytes: float) -> float:
        """Seconds for one message of `nbytes` bytes, one way."""
        return self.latency_us * 1e-6 + nbytes * 8 / (self.bandwidth_gbps * 1e9)

    def with_overrides(self, bandwidth_gbps: float | None = None, latency_us: float | None = None) -> "Link":
        """This link with the given fields replaced (the source says which)."""
        changed = {k: v for k, v in (("bandwidth_gbps", bandwidth_gbps), ("latency_us", latency_us))
                   if v is not None}
        if not changed:
            return self
        said = ", ".join(f"{k} {v:g}" for k, v in changed.items())
        return replace(self, **changed, source=f"{self.source}; overridden: {said}")

    def describe(self) -> str:
        """'rdma: 400 Gb/s, 33 us per message (Lamina paper ...)'."""
        return f"{self.name}: {self.bandwidth_gbps:g} Gb/s, {self.latency_us:g} us per message ({self.source})"

    def to_dict(self) -> dict:
        return {"name": self.name, "bandwidth_gbps": self.bandwidth_gbps, "latency_us": self.latency_us,
                "source": self.source}


_PAPER_BANDWIDTH = "400 Gb/s: one RDMA NIC per GPU, the datacenter network the Lamina paper assumes"
LINKS: dict[str, Link] = {
    "rdma": Link("rdma", 400.0, 33.0,
                 f"Lamina paper s. 6.3: fully host-bypassed RDMA, 33.0 us per message; {_PAPER_BANDWIDTH}"),
    "nccl": Link("nccl", 400.0, 66.6,
                 f"Lamina paper s. 6.3: NCCL over the same RDMA network, 66.6 us per message; {_PAPER_BANDWIDTH}"),
    "tcp": Link("tcp", 100.0, 100.0,
                "ASSUMPTION: no RDMA, NCCL or gloo sockets over 100 Gb/s Ethernet, 100 us per message"),
}
DEFAULT_LINK = LINKS["rdma"]


# Not a link: the cost tables' own `network` curves (measured by profile_costs.py, on one host).
TABLE = "table"


def choose_link(name: str, bandwidth_gbps: float | None = None, latency_us: float | None = None) -> Link | None:
    """A preset by name, with overrides; None for TABLE. ValueError for an unknown name, or
    for overrides of TABLE (a measured curve has no bandwidth to replace)."""
    if name == TABLE:
        if bandwidth_gbps is not None or latency_us is not None:
            raise ValueError(f"--link {TABLE} keeps the cost tables' measured network curves; "
                             f"--link-bandwidth-gbps / --link-latency-us need a link preset ({', '.join(LINKS)})")
        return None
    if name not in LINKS:
        raise ValueError(f"unknown link {name!r} (presets: {', '.join(LINKS)}, or {TABLE})")
    return LINKS[name].with_overrides(bandwidth_gbps, latency_us)


def describe_link(link: Link | None) -> str:
    return link.describe() if link is not None else f"{TABLE}: each attention cost table's network curve"
