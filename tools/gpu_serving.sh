#!/usr/bin/env bash
# On a device machine (Python 3.12, torch, triton, transformers; no megatron-core or server
# packages): install the carried wheels, run the one-GPU GPU tests, then the serving benchmark
# (tools/serving_benchmark.py: random 8B checkpoint, the server's closed batch and trace replay,
# the batch job, bench_decode at the decode window). Usage, from the repo root, with .whl carried:
#   bash tools/gpu_serving.sh OUT_DIR [serving_benchmark.py options]
# GPU_TESTS=0 skips the tests. .whl/ holds, for the image's Python 3.12 (made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
#     megatron-core==0.16.1 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 uvicorn==0.55.0 opentelemetry-api==1.45.3 \
#     httptools==0.9.0 transformers==5.25.0 tokenizers==0.23.3 huggingface_hub==2.4.0 einops==0.8.2 \
#     httpx2==2.17.0 httpcore2==2.17.0 click==8.5.1 hf-xet==1.8.0 truststore==0.10.5 h11==0.16.0 anyio==4.16.0 \
#     idna==3.21 xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 pytest-xdist==3.8.0 execnet==2.1.2
# (transformers >= 5.20 for the chat path's sanitize_control_tokens; the image has an older one;
# huggingface_hub 2.x imports httpx2, click and hf-xet, which the image lacks; pytest-xdist for
# pyproject's addopts, and the GPU tests run in one process, -n 0, on the one GPU).
set -uo pipefail
out=${1:-/tmp/serving-out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${GPU_TESTS:-1}" != 0 ]; then
    timeout "${GPU_TESTS_TIMEOUT:-300}" python3 -m pytest tests/test_gpu.py -q -x -p no:cacheprovider -n 0 2>&1 \
        | tee "$out/gpu_tests.log" | tail -15
fi
python3 tools/serving_benchmark.py --out-dir "$out" "${@:2}" 2>&1 | tee "$out/serving.log" | grep -v "^\[" | tail -40
