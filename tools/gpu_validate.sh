#!/usr/bin/env bash
# On a device machine (Python 3.12, torch, triton, transformers, no megatron-core or server
# packages): install the carried wheels, then run the planner's device validation
# (tools/validate_planner.py: random llama3-8b checkpoint, cost table, real server, two trace
# slices, simulator, the comparison table last). Usage, from the repo root, with .whl carried:
#   bash tools/gpu_validate.sh OUT_DIR [validate_planner.py options]
# .whl/*.whl are always installed (into /tmp/site, first on PYTHONPATH); .whl/fallback/*.whl
# only for the modules the image lacks, so that the image's own transformers keeps the
# tokenizers/safetensors/pyyaml/tqdm versions it was built with.
set -uo pipefail
out=${1:-/tmp/validate-out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
missing=()
for pair in safetensors:safetensors yaml:pyyaml tqdm:tqdm matplotlib:matplotlib contourpy:contourpy \
            kiwisolver:kiwisolver cycler:cycler fontTools:fonttools pyparsing:pyparsing dateutil:python_dateutil \
            PIL:pillow packaging:packaging tzdata:tzdata; do
    python3 -c "import ${pair%%:*}" 2>/dev/null || missing+=(.whl/fallback/"${pair#*:}"-*.whl)
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing fallbacks: ${missing[*]}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${missing[@]}" || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 - <<'EOF'
import importlib
for name in ("torch", "triton", "transformers", "tokenizers", "safetensors", "yaml", "tqdm", "megatron.core",
             "fastapi", "uvicorn", "uvloop", "httptools", "starlette", "pydantic", "prometheus_client", "httpx", "matplotlib"):
    try:
        module = importlib.import_module(name)
        print(f"  {name:<18} {getattr(module, '__version__', '?'):<14} {module.__file__}")
    except Exception as e:  # noqa: BLE001 - a report, not a check
        print(f"  {name:<18} MISSING ({type(e).__name__}: {e})")
EOF
python3 tools/validate_planner.py --device cuda --out-dir "$out" --work-dir /tmp/validate-work "${@:2}" 2>&1 \
    | tee "$out/validate.log"
exit "${PIPESTATUS[0]}"
