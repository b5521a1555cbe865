"""Device prices and datasheet numbers (configs/planner/prices.yaml), for costing and synthetic tables.

`load_prices(path)` returns the `DeviceSpec` of every device in the file and the file's
`interconnect` as a `Link` (link.py; the synthetic tables' network curve). The defaults shipped in
configs/planner/prices.yaml are the Lamina paper's Table 1 (H100, H20) plus an H200 whose price is
an assumption; every assumed number is marked as such in that file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_lamina.planner.link import Link

DEFAULT_PRICES = Path(__file__).resolve().parents[2] / "configs" / "planner" / "prices.yaml"


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    price_per_hour: float   # USD
    tflops: float           # dense bf16 peak
    memory_gb: float        # 1e9 bytes
    bandwidth_tbs: float    # HBM
    nvlink_gbs: float       # one direction
    source: str = ""
    gpus_per_node: int | None = None   # GPUs in one machine of this type (None: lamina plan's --gpus-per-node)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


_DEVICE_KEYS = {"price_per_hour", "tflops", "memory_gb", "bandwidth_tbs", "nvlink_gbs", "source", "gpus_per_node"}
_OPTIONAL_KEYS = {"source", "gpus_per_node"}


def _device_value(key: str, value):
    if key == "source":
        return str(value)
    if key == "gpus_per_node":
        return int(value)
    return float(value)


def load_prices(path: str | Path = DEFAULT_PRICES) -> tuple[dict[str, DeviceSpec], Link]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"{path}: no such prices file (see configs/planner/prices.yaml)") from None
    devices = {}
    for name, spec in (data.get("devices") or {}).items():
        unknown = set(spec) - _DEVICE_KEYS
        missing = _DEVICE_KEYS - _OPTIONAL_KEYS - set(spec)
        if unknown or missing:
            raise ValueError(f"{path}: device {name}: unknown keys {sorted(unknown)}, missing keys "
                             f"{sorted(missing)} (known: {sorted(_DEVICE_KEYS)})")
        devices[name] = DeviceSpec(name=name, **{k: _device_value(k, v) for k, v in spec.items()})
    if not devices:
        raise ValueError(f"{path}: no devices (expected a 'devices:' mapping)")
    link = data.get("interconnect") or {}
    # prices.yaml gives GB/s (bytes), as its other bandwidths; a Link counts bits, as NICs do.
    return devices, Link(f"{path.name} interconnect", float(link.get("bandwidth_gbs", 50)) * 8,
                         float(link.get("latency_us", 10)), f"{path} (interconnect)")
