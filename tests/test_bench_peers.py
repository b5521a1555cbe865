"""tools/bench_peers.py on CPU: our engine, Megatron-core's static inference path and
`transformers` generate, built from one set of random weights, decode the same greedy tokens
(the check that the peer benchmark compares the same model); no timing thresholds."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_peers.py"


def main(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("bench_peers", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.fixture
def restored_environ():
    """Megatron's GPTModel exports NVTE_* attention-backend variables into os.environ (local
    backend: NVTE_FLASH_ATTN=0, ...), which later subprocesses would inherit: a Megatron save
    in another test then refuses its own default backend. Put the environment back, and close
    the one-rank process group the tool opened in this process."""
    import torch.distributed as dist

    saved = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def test_three_systems_decode_the_same_tokens(tmp_path, restored_environ):
    import json

    out = tmp_path / "peers.json"
    assert main(["--device", "cpu", "--shape", "tiny", "--batches", "2", "--contexts", "16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    tokens = result["greedy"]
    assert tokens["ours"] == tokens["hf"] == tokens["megatron"]
    assert result["greedy_agreement_with_hf"] == {"ours": 1.0, "megatron": 1.0}
    assert all(ms > 0 for ms in result["decode_ms"].values())
