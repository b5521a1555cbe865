#!/usr/bin/env bash
# On a device machine (Python 3.12, torch, triton, transformers, no megatron-core): install the
# carried wheels, run the GPU tests and the attention benchmark. Usage, from the repo root:
#   bash tools/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/gpu-out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest tests/test_gpu.py -q -x -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -15
python3 tools/bench_attention.py --out "$out/bench_attention.json" "${@:2}" 2>&1 | tee "$out/bench_attention.log" | tail -25
