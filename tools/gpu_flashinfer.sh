#!/usr/bin/env bash
# On a device machine: install the cut-down FlashInfer bundle (.whl-fi/, made here by
# tools/pack_flashinfer.py) next to the carried wheels, JIT-build its paged decode, check it
# against the float32 reference (the benchmark's mixed-length check) and time it there.
#   bash tools/gpu_flashinfer.sh OUT_DIR [bench_attention.py arguments]
set -uo pipefail
out=${1:-/tmp/gpu-out}; mkdir -p "$out"
pip_install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
pip_install .whl/*.whl && pip_install .whl-fi/*.whl && tar xzf .whl-fi/flashinfer*.tar.gz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export FLASHINFER_CUDA_ARCH_LIST=9.0a FLASHINFER_WORKSPACE_BASE=/tmp/fiws MAX_JOBS=16
# FlashInfer links with -lcuda; CUDA 13.0 here ships no stub, so point the linker at the driver's.
if ! ls "$CUDA_HOME"/lib64/stubs/libcuda.so /usr/lib/x86_64-linux-gnu/libcuda.so >/dev/null 2>&1; then
    mkdir -p /tmp/cudastub && ln -sf "$(ldconfig -p | awk '/libcuda.so.1 /{print $NF; exit}')" /tmp/cudastub/libcuda.so
    export LIBRARY_PATH=/tmp/cudastub${LIBRARY_PATH:+:$LIBRARY_PATH}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

python3 tools/bench_attention.py --out "$out/bench_attention.json" "${@:2}" 2>&1 | tee "$out/bench_attention.log" \
    | grep -v '^{' | tail -25
