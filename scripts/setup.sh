#!/usr/bin/env bash
# Installs what uresnet needs into the current Python (3.10+; a virtual environment, see README) and builds
# its C++ extension, with the CUDA kernels when a GPU is visible or URESNET_CUDA=1 (setup.py).
# Idempotent: pinned packages that are already installed are left as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "$($PY -c 'import sys; print(sys.prefix == sys.base_prefix)')" = True ]; then
    echo "uresnet: note: installing into $($PY -c 'import sys; print(sys.prefix)'), not a virtual environment" \
         "(about 6 GB; README: python3 -m venv .venv && . .venv/bin/activate first)"
fi
# The CUDA build of torch, even on a machine without a GPU: the CPU wheel has no matching
# torchvision (timm needs it) and cannot compile the CUDA kernels. torchvision is pinned in the
# same command, or pip swaps torch for the newest release.
$PY -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
$PY -m pip install --quiet timm huggingface_hub numpy tqdm safetensors matplotlib ninja pybind11 pytest pytest-benchmark \
    segmentation-models-pytorch onnx onnxscript onnxruntime "ruff==0.17.6"
# --no-build-isolation: compile against the torch installed above, not a fresh copy in a build env.
# The object files persist in build/temp (setup.py): a second run on an unchanged tree only relinks.
start=$(date +%s)
log=$(mktemp)
MAX_JOBS=${MAX_JOBS:-2} $PY -m pip install -v --no-build-isolation --no-deps -e . > "$log" 2>&1 \
    || { tail -60 "$log"; echo "uresnet: build failed (full log: $log)" >&2; exit 1; }
# Show what was compiled (the nvcc line proves the CUDA kernels were built) and what setup.py says.
grep -E "(nvcc|c\+\+) .* -c .*csrc/|uresnet setup.py" "$log" | sed -E 's/ -I[^ ]+//g' | cut -c1-220 || true
echo "uresnet: extension built and installed in $(( $(date +%s) - start )) s (log: $log)"
