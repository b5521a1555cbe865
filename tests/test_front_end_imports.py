"""The tree's boundaries, as imports: the HTTP front end loads the request contract and
nothing of the driver, the workers or Megatron-core; the contract itself needs no torch.

Each check runs in a fresh interpreter (a test process has imported everything already).
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import megatron_lamina.requests
import megatron_lamina.server

# The contract's modules that reach a library bringing torch: the text codec (transformers,
# which the front end needs anyway) and the grammar compiler (xgrammar's token bitmasks).
BRINGS_TORCH = {"megatron_lamina.requests.tokenizer", "megatron_lamina.requests.grammar"}


def _loaded_after(modules: list[str]) -> list[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _package_modules(package) -> list[str]:
    return [m.name for m in pkgutil.iter_modules(package.__path__, package.__name__ + ".")]


def test_the_front_end_loads_no_driver_worker_or_megatron_module():
    server = _package_modules(megatron_lamina.server)
    assert "megatron_lamina.server.frontend" in server and "megatron_lamina.server.app" in server
    loaded = _loaded_after(server)
    forbidden = [m for m in loaded if m.split(".")[:2] in (["megatron_lamina", p] for p in
                                                            ("driver", "worker", "batch", "model", "attention",
                                                             "transport", "checkpoint", "planner"))
                 or m == "megatron" or m.startswith("megatron.")]
    assert forbidden == [], forbidden
    assert "megatron_lamina.requests.engine_link" in loaded  # it did load the contract


def test_the_request_contract_needs_no_torch():
    contract = [m for m in _package_modules(megatron_lamina.requests) if m not in BRINGS_TORCH]
    assert "megatron_lamina.requests.sampling_params" in contract
    loaded = _loaded_after(contract)
    assert "torch" not in loaded and "transformers" not in loaded
    assert not [m for m in loaded if m.startswith("megatron_lamina.") and
                m.split(".")[1] not in ("requests", "config", "architecture")], loaded
