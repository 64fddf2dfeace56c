#!/usr/bin/env bash
# GPU validation in stages, each under its own time limit so that one slow stage cannot eat a
# device call (10 minutes at most; the machine does not stay warm between calls, so every call
# starts with `build`). Everything goes under $OUT, at most 8 files:
#   build.log  tests.log  sanitize.log  bench_<op>.json (x3)  bench.md  |  models.json
#
#   bash scripts/gpu_suite.sh                      # build tests sanitize   (at most 9.5 minutes)
#   bash scripts/gpu_suite.sh build bench          # the op benchmarks      (at most 9.7 minutes)
#   bash scripts/gpu_suite.sh build models         # the model train steps at batch 16
#
# Stages: build (pip install with this machine's python3, no network), tests (tests/test_cuda.py
# first, then the rest), sanitize (compute-sanitizer memcheck and racecheck over
# scripts/run_each_kernel.py), bench (benchmarks/, one JSON per op, then the report), models
# (`uresnet bench --models`). Limits in seconds: LIMIT_<STAGE>=..., e.g. LIMIT_TESTS=300.
set -uo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TRITON_INTERPRET=0 URESNET_REQUIRE_EXTENSION=1
[ $# -gt 0 ] || set -- build tests sanitize
failed=0

stage_build() {
    { nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
      python3 -m pip install --no-build-isolation --no-deps --no-index -e .
    } > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }
    python3 -c "import uresnet_ops as u; print('backends:', u.available_backends())" 2>&1 | tee -a "$OUT/build.log"
}

stage_tests() {  # the CUDA tests first: they are what only this machine can run
    python3 -m pytest -q -p no:cacheprovider -rfE tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -15
    local cuda_status=${PIPESTATUS[0]}
    local parallel=()
    python3 -c "import xdist" 2> /dev/null && parallel=(-n 8)
    python3 -m pytest -q -p no:cacheprovider -rfE "${parallel[@]}" tests --ignore=tests/test_cuda.py 2>&1 \
        | tee -a "$OUT/tests.log" | tail -15
    local rest_status=${PIPESTATUS[0]}
    [ "$cuda_status" -eq 0 ] && [ "$rest_status" -eq 0 ]
}

stage_sanitize() {
    local status=0 tool
    for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool" >> "$OUT/sanitize.log"
        compute-sanitizer --tool "$tool" --error-exitcode 3 python3 scripts/run_each_kernel.py \
            >> "$OUT/sanitize.log" 2>&1 || status=1
        grep -E "ERROR SUMMARY|failure\(s\)" "$OUT/sanitize.log" | tail -2
    done
    return "$status"
}

stage_bench() {  # one JSON per op, so that a stopped run keeps the ops already measured
    local status=0 op
    for op in pixel_shuffle_bn shuffle_upsample multi_dilation_conv2d; do
        python3 -m pytest -q -p no:cacheprovider "benchmarks/bench_$op.py" --bench-time "${BENCH_TIME:-0.5}" \
            --benchmark-json="$OUT/bench_$op.json" 2>&1 | tail -2
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        python3 benchmarks/report.py "$OUT/bench_$op.json" --out "$OUT" > /dev/null 2>&1
        rm -f "$OUT/bench_$op.png"  # the charts would pass the 8 files that come back
    done
    cat "$OUT"/bench_*.md > "$OUT/bench.md" && rm -f "$OUT"/bench_*.md && echo "report: $OUT/bench.md"
    return "$status"
}

stage_models() {
    python3 -m uresnet_models bench --models --device cuda --size full --rounds 5 --json "$OUT/models.json"
}

if [ "${1:-}" = "--stage" ]; then  # one stage, run by the loop below under its time limit
    "stage_$2"
    exit $?
fi

# The limits add up to under 10 minutes for each of the three calls shown at the top.
declare -A LIMITS=([build]=180 [tests]=270 [sanitize]=120 [bench]=400 [models]=400)
for stage in "$@"; do
    [ -n "${LIMITS[$stage]:-}" ] || { echo "gpu_suite: unknown stage '$stage' (build tests sanitize bench models)" >&2; exit 2; }
    limit_var="LIMIT_${stage^^}"
    limit=${!limit_var:-${LIMITS[$stage]}}
    start=$SECONDS
    OUT=$OUT timeout --signal=INT --kill-after=20 "$limit" bash "$SELF" --stage "$stage"
    status=$?
    [ "$status" -eq 124 ] && echo "[$stage] stopped at its $limit s limit"
    echo "[$stage] exit $status after $(( SECONDS - start )) s"
    if [ "$status" -ne 0 ]; then
        failed=1
        [ "$stage" = build ] && exit 1
    fi
done
exit "$failed"
