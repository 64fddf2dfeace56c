#!/usr/bin/env bash
# One device call: build the extension with this machine's python3 (no network), run the whole
# test suite (CUDA tests included), run the benchmarks and write everything under $OUT.
#   device run:  bash scripts/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/env.txt" 2>&1
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
TRITON_INTERPRET=0 URESNET_REQUIRE_EXTENSION=1 python3 -m pytest -q -p no:cacheprovider tests \
    --junitxml="$OUT/tests.xml" 2>&1 | tail -40
python3 -m pytest -q -p no:cacheprovider benchmarks --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1
tail -5 "$OUT/bench.log"
python3 benchmarks/report.py "$OUT/bench.json" --out "$OUT" > /dev/null && echo "report: $OUT/bench.md"
