"""Shared fixtures: tiny LLaMA checkpoints (HF and converted) and their HF reference outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiny_models import reference_greedy, save_tiny_llama  # noqa: E402

PROMPTS = [[1, 5, 9, 14, 3], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [1, 77], [1, 8, 100, 200, 31, 7, 7, 7]]
MAX_TOKENS = 6


class TinyModel:
    def __init__(self, hf_dir: Path, canonical_dir: Path):
        self.hf_dir, self.canonical_dir = hf_dir, canonical_dir
        self.tokens, self.logits = reference_greedy(hf_dir, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="session", params=["untied", "tied"])
def tiny_model(request, tmp_path_factory) -> TinyModel:
    return _tiny(tmp_path_factory, request.param == "tied")


_CACHE: dict[bool, TinyModel] = {}


def _tiny(tmp_path_factory, tied: bool) -> TinyModel:
    if tied not in _CACHE:
        from megatron_lamina.checkpoint.convert import convert_checkpoint

        base = tmp_path_factory.mktemp("tied" if tied else "untied")
        hf_dir = save_tiny_llama(base / "hf", tied=tied)
        canonical = convert_checkpoint("hf", hf_dir, base / "canonical", dtype="float32")
        _CACHE[tied] = TinyModel(hf_dir, Path(canonical))
    return _CACHE[tied]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, TinyModel]:
    return {"untied": _tiny(tmp_path_factory, False), "tied": _tiny(tmp_path_factory, True)}
