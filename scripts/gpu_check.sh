#!/usr/bin/env bash
# The GPU check: everything this project can only check on a GPU, in ONE device call of at most
# 8 minutes (give the call timeout_s ~ 560; device time is 15 minutes per session in all, machine
# start included, so a rerun or a second short call still fits). Each step runs under its own
# `timeout`, logs to $OUT/<step>.log (at most 8 files come back), and a failed or stopped step
# does not stop the next one (except the build). Exit status: 1 if any step failed.
#
#   bash scripts/gpu_check.sh              # on the GPU machine (its own python3), results under $OUT
#   bash scripts/gpu_check.sh --dry-run    # print the steps and their limits, run nothing
#
# Carry .triton-cache (git-ignored, TRITON_CACHE_DIR) back and forth so a rerun reuses compiled kernels.
#
# Time budget (seconds; the limits sum to 470 < 480). How estimated: on this project's 2-core
# CPU machine (triton 3.8, scripts/gpu_resources.py, which compiles the same kernels for sm_90):
# a Triton compile takes 0.3-1.5 s (pixel_shuffle_bn, shuffle_upsample) and 1.5-4 s
# (multi_dilation_conv2d's tl.dot kernels); an autotuned launch compiles every config (5 + 4 + 4)
# the first time per key. nvcc: one .cu file takes 30-55 s with torch's headers (ENV.md).
#   build     120  pip install with MAX_JOBS=16: the 3 .cu and 4 .cpp files compile in parallel,
#                  so about the slowest file (~60 s) + link; skipped when uresnet_ops._C imports.
#   kernels    90  run_each_kernel.py for cuda and triton: 22 calls x 4 dtypes each; the Triton
#                  side compiles ~60 variants cold (~40 s of pixel_shuffle_bn/shuffle_upsample,
#                  ~13 configs x 3 dtype keys x 2-3 s for multi_dilation_conv2d's autotuning,
#                  which the tests and later steps reuse from the cache).
#   tests     140  tests/test_cuda.py -n 8 without the > 2^31-element tests: ~800 cases, each
#                  milliseconds on the GPU; the cost is Triton compiles, spread over 8 workers
#                  sharing the cache (most already compiled by `kernels`).
#   big        50  the > 2^31-element tests, serially: 2 tests x 2 layouts x 3 backends, each
#                  allocating 8-24 GiB (a second or two each on the GPU, plus Triton compiles
#                  for the new int64 stride specialisations).
#   memcheck   50  compute-sanitizer memcheck of run_each_kernel.py in float32, no caching
#                  allocator: the cuda backend with only kernels named *uresnet* instrumented,
#                  then the triton backend (unfiltered; the kernels are compiled by then).
#   bench      20  one bf16 shape per op, train forward+backward, no torch.compile baseline
#                  (its compile alone would take minutes), short timing; only if time is left.
set -uo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
OUT=${OUT:-bench-results/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 URESNET_REQUIRE_EXTENSION=1 URESNET_CUDA=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
unset TRITON_INTERPRET  # compile and run the Triton kernels on the GPU
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
TOTAL=470
START=$SECONDS
failed=0

# step NAME LIMIT: run the function NAME below (in a child bash) under `timeout LIMIT`, capped by
# what is left of TOTAL, output to $OUT/NAME.log.
step() {
    local name=$1 limit=$2
    local left=$(( TOTAL - (SECONDS - START) ))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$DRY" -eq 1 ]; then
        echo "[$name] limit ${limit}s:"
        declare -f "$name" | sed -n '3,$p' | sed '$d'
        return 0
    fi
    if [ "$limit" -le 5 ]; then
        echo "[$name] skipped: no time left"
        return 0
    fi
    local t0=$SECONDS status
    timeout --signal=INT --kill-after=10 "$limit" bash "$SELF" --run "$name" > "$OUT/$name.log" 2>&1
    status=$?
    [ "$status" -eq 124 ] && echo "[$name] stopped at its ${limit}s limit"
    echo "[$name] exit $status after $(( SECONDS - t0 ))s; last lines of $OUT/$name.log:"
    tail -4 "$OUT/$name.log" | sed 's/^/    /'
    [ "$status" -eq 0 ] || failed=1
    return "$status"
}

build() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    if "$PY" -c "import uresnet_ops._C" 2> /dev/null; then
        echo "uresnet_ops._C imports: build skipped"
    else
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || return 1
    fi
    "$PY" -c "import uresnet_ops as u; print('backends:', u.available_backends())"
}

kernels() {
    local status=0
    "$PY" scripts/run_each_kernel.py --backend cuda || status=1
    "$PY" scripts/run_each_kernel.py --backend triton --dtype float32 float16 bfloat16 || status=1  # float64: not Triton
    return "$status"
}

memcheck() {  # no caching allocator: an access past a tensor's end inside a cached block is seen
    local filter=(--kernel-name kns=uresnet) status=0  # the C++/CUDA kernels are in namespace uresnet
    compute-sanitizer --help | grep -q -- "--kernel-name" || filter=(--kernel-regex kns=uresnet)  # older versions
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    compute-sanitizer --tool memcheck --error-exitcode 3 "${filter[@]}" \
        "$PY" scripts/run_each_kernel.py --backend cuda --dtype float32 || status=1
    # The Triton kernels share no name pattern that ATen's lack: unfiltered, float32 only, last.
    compute-sanitizer --tool memcheck --error-exitcode 3 \
        "$PY" scripts/run_each_kernel.py --backend triton --dtype float32 || status=1
    return "$status"
}

tests() {
    "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rfE -n 8 -k "not 2_pow_31"
}

big() {
    "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rfE -k "2_pow_31"
}

bench() {  # the first shape of each op's cases (one JSON: at most 8 files come back)
    local op shapes=()
    for op in pixel_shuffle_bn shuffle_upsample multi_dilation_conv2d; do
        shapes+=("$("$PY" -m pytest "benchmarks/bench_$op.py" --collect-only -q --bench-dtype bfloat16 2> /dev/null \
                   | grep -m1 -oE '\[[^-]+' | tr -d '[')")
    done
    local any
    any=$(IFS="|"; echo "${shapes[*]}" | sed 's/|/ or /g')
    "$PY" -m pytest benchmarks -q -p no:cacheprovider --bench-dtype bfloat16 --bench-time 0.2 \
        -k "($any) and train_fwdbwd and not compiled" --benchmark-columns=median,rounds \
        --benchmark-json="$OUT/bench.json"
}

if [ "${1:-}" = "--run" ]; then  # one step, run by step() under its time limit
    "$2"
    exit $?
fi

step build 120 || { echo "gpu_check: build failed, stopping"; exit 1; }
step kernels 90
step tests 140
step big 50
step memcheck 50
step bench 20
echo "gpu_check: finished in $(( SECONDS - START ))s, $([ "$failed" -eq 0 ] && echo "every step passed" || echo "FAILED")"
exit "$failed"
