#!/usr/bin/env bash
# On a device machine (Python 3.12, torch, triton, transformers; no megatron-core or server
# packages): install the carried wheels, run the one-GPU GPU tests, then the serving benchmark
# (tools/serving_benchmark.py: random 8B checkpoint, the server's closed batch and trace replay,
# the batch job, bench_decode at the decode window). Usage, from the repo root, with .whl carried:
#   bash tools/gpu_serving.sh OUT_DIR [serving_benchmark.py options]
# GPU_TESTS=0 skips the tests.
set -uo pipefail
out=${1:-/tmp/serving-out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${GPU_TESTS:-1}" != 0 ]; then
    timeout "${GPU_TESTS_TIMEOUT:-300}" python3 -m pytest tests/test_gpu.py -q -x -p no:cacheprovider 2>&1 \
        | tee "$out/gpu_tests.log" | tail -15
fi
python3 tools/serving_benchmark.py --out-dir "$out" "${@:2}" 2>&1 | tee "$out/serving.log" | grep -v "^\[" | tail -40
