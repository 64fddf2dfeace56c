#!/usr/bin/env bash
# The GPU check: everything this project can only check on a GPU, in ONE device call. Each step
# runs under its own `timeout`, logs to $OUT/<log> (8 files come back at most: see OUT_FILES), and a
# failed or stopped step does not stop the next one (except the build). Exit status 1 if any failed.
#
#   bash scripts/gpu_check.sh              # on the GPU machine (its own python3), results under $OUT
#   bash scripts/gpu_check.sh --rehearse [PART...]  # here, without a GPU: what each step can check
#                                          # without one (parts: build kernels tests memcheck bench files)
#   bash scripts/gpu_check.sh --dry-run    # print the steps and their limits, run nothing
#
# Give the device call timeout_s=540 and no `carry` (nothing it needs is ignored by git; a carried
# path that does not exist here is deleted there). Only $OUT comes back: the Triton cache lives in
# /tmp there and dies with the machine.
#
# Predicted wall time on the device (16 cores, cold caches), from measurements on this project's
# 2-core CPU machine (busy EPYC Zen 3; a device core is assumed no faster than one here):
#   step            predicted  limit  how
#   machine start     60-120     -    device README: "a minute or more"
#   build               ~135    220   the slowest file bounds a parallel build (MAX_JOBS=16, 7 files):
#                                     csrc/cpu/shuffle_upsample.cpp 118 s CPU with torch 2.11 (ENV.md),
#                                     + link ~5 s + pip and setup.py ~10 s (pip's metadata step: 5 s here)
#   kernels_triton       ~60    150   runs beside the build (9 cores are free): one process per op x
#                                     dtype (9); a Triton compile for sm_90 takes ~2 CPU-s here (gpu_resources:
#                                     526 compiles in 519 s on 2 cores), the slowest process
#                                     (multi_dilation_conv2d: ~12 autotune configs x 3-4 s) ~45 s + imports
#   kernels_cuda         ~15     60   no compiles: imports, CUDA init, 36 small calls
#   tests               ~100    150   tests/test_cuda.py -n 16 (~820 cases, ms each on the GPU): 16 workers
#                                     start in ~10 s; Triton compiles for the test shapes (~300 x 2 s,
#                                     counted twice for workers compiling the same kernel at once) / 16
#   big                  ~45     75   the 12 > 2^31-element cases serially: ~1-2 s each + their 64-bit
#                                     index Triton compiles (~12 x 2 s)
#   memcheck          0 / ~40    80   skipped on gVisor (uname -r 4.4.0: "Device not supported"); else 2
#                                     sanitizer runs of the float32 calls, kernels already compiled
#   bench                ~45     60   3 shapes x bf16 train fwd+bwd x each backend, 0.2 s timing each;
#                                     pytest start and collection 12-17 s here, mdc autotuning ~10 s
#   total            340-380    480   + start 60-120 s: ~500 s of the 900 s device budget, leaving a
#                                     second short call (the machine stays warm 30 s after a call)
# The limits cap each step; TOTAL caps the sum (a slow step shortens the later ones).
set -uo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
PY=${PYTHON:-python3}
MODE=run
case "${1:-}" in
    --dry-run) MODE=dry ;;
    --rehearse) MODE=rehearse ;;
    --step | "") ;;
    *) echo "gpu_check: unknown argument '$1' (expected --rehearse, --dry-run or none)" >&2; exit 2 ;;
esac
OUT=${OUT:-bench-results/gpu_check}
[ "$MODE" = rehearse ] && OUT=$(mktemp -d)  # never the device's $OUT: the rehearsal writes stand-ins
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 URESNET_REQUIRE_EXTENSION=1 URESNET_CUDA=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/uresnet-triton-cache}
[ "$MODE" = rehearse ] || unset TRITON_INTERPRET  # on the GPU the Triton kernels are compiled and run
TOTAL=480

# ---- What the steps run: shared by the device run and the rehearsal -------------------------
OUT_FILES=(gpu_check.log build.log kernels.log tests.log big.log memcheck.log bench.log bench.json)
BUILD=("$PY" -m pip install --no-build-isolation --no-deps --no-index -e .)
OPS=(pixel_shuffle_bn shuffle_upsample multi_dilation_conv2d)
TRITON_DTYPES=(float32 float16 bfloat16)  # float64: not a Triton dtype on the GPU
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE)
TESTS=(tests/test_cuda.py -k "not 2_pow_31")
BIG=(tests/test_cuda.py -k "2_pow_31")
BIG_CASES=12  # 2 tests x 2 layouts x 3 backends
SANITIZER=(compute-sanitizer --tool memcheck --error-exitcode 3)
BENCH=("$PY" -m pytest benchmarks/bench_pixel_shuffle_bn.py benchmarks/bench_shuffle_upsample.py
       benchmarks/bench_multi_dilation_conv2d.py -q -p no:cacheprovider --bench-dtype bfloat16 --bench-size full)

triton_kernel_regex() {  # every @triton.jit *_kernel of this project, by name (Triton keeps it)
    grep -ho '^def _[a-z0-9_]*_kernel' uresnet_ops/triton/*.py | sed 's/^def //' | sort -u | paste -sd'|' |
        sed 's/.*/^(&)$/'
}

sanitizer_filter() {  # the C++/CUDA kernels are in namespace uresnet (mangled: 7uresnet)
    if [ "$1" = cuda ]; then echo "kns=uresnet"; else echo "regex=$(triton_kernel_regex)"; fi
}

bench_select() {  # the -k of the first full-size shape of each op
    "$PY" - "${OPS[@]}" <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
import cases
labels = [next(c for c in cases.CASES if c.op == op and "full" in c.sizes).label
          for op in sys.argv[1:]]
print("(" + " or ".join(labels) + ") and train_fwdbwd and not compiled")
EOF
}

# ---- The steps on the device -----------------------------------------------------------------
build() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "kernel $(uname -r), $(nproc) cores"
    "${BUILD[@]}" || return 1
    "$PY" -c "import uresnet_ops as u; print('backends:', u.available_backends())"
}

triton_splits() {  # the arguments of each kernels_triton process, one line each: one op and dtype
    local op dtype
    for op in "${OPS[@]}"; do
        for dtype in "${TRITON_DTYPES[@]}"; do
            echo "--backend triton --op $op --dtype $dtype"
        done
    done
}

kernels_triton() {  # beside the build: no extension needed; each process compiles its own kernels
    unset URESNET_REQUIRE_EXTENSION
    local args names=() pids=() i status=0
    while read -r args; do
        names+=("${args#--backend triton }")
        # shellcheck disable=SC2086  # the words of one line are the arguments
        "$PY" scripts/run_each_kernel.py $args 2>&1 | sed -u "s/^/[${names[-1]}] /" &
        pids+=($!)
    done < <(triton_splits)
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || { status=1; echo "FAILED: run_each_kernel.py --backend triton ${names[$i]}"; }
    done
    echo "kernels_triton: ${#pids[@]} processes, $([ "$status" -eq 0 ] && echo "all passed" || echo "some FAILED")"
    return "$status"
}

kernels_cuda() {
    "$PY" scripts/run_each_kernel.py --backend cuda
}

tests() {
    "${PYTEST[@]}" "${TESTS[@]}" -n 16
}

big() {
    "${PYTEST[@]}" "${BIG[@]}"
}

memcheck() {  # no caching allocator: an access past a tensor's end inside a cached block is seen
    case "$(uname -r)" in
        4.4.0*) echo "memcheck SKIPPED: gVisor kernel (uname -r $(uname -r)): compute-sanitizer answers" \
                     "'Device not supported' there"; return 0 ;;
    esac
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    local backend status=0
    for backend in cuda triton; do
        "${SANITIZER[@]}" --kernel-name "$(sanitizer_filter "$backend")" \
            "$PY" scripts/run_each_kernel.py --backend "$backend" --dtype float32 || status=1
    done
    return "$status"
}

bench() {
    "${BENCH[@]}" -k "$(bench_select)" --bench-time 0.2 --benchmark-columns=median,rounds \
        --benchmark-json="$OUT/bench.json"
}

# ---- The rehearsal: each step without a GPU --------------------------------------------------
collected() {  # how many tests a pytest selection collects on the GPU machine (node ids)
    PYTHONPATH=scripts${PYTHONPATH:+:$PYTHONPATH} "${PYTEST[@]}" -p collect_as_on_cuda "$@" --collect-only 2>&1 |
        grep -c "::"
}

rehearse_build() {  # pip prepares the editable install (setup.py with URESNET_CUDA=1) and compiles nothing
    "${BUILD[@]}" --dry-run 2>&1 | grep -E "Would install|ERROR|uresnet" || return 1
}

rehearse_kernels() {  # each process's calls, listed (one python): together every Triton call
    triton_splits | "$PY" -c '
import sys
sys.path.insert(0, "scripts")
from contextlib import redirect_stdout
from io import StringIO
import run_each_kernel

def calls(args):
    out = StringIO()
    with redirect_stdout(out):
        assert run_each_kernel.main(args + ["--list"]) == 0, args
    return out.getvalue().splitlines()

splits = [calls(line.split()) for line in sys.stdin]
every = calls(["--backend", "triton", "--dtype", *sys.argv[1:]])
cuda = calls(["--backend", "cuda"])
print(f"kernels_triton: {len(splits)} processes, {sum(map(len, splits))} calls (all: {len(every)}); "
      f"kernels_cuda: {len(cuda)} calls")
sys.exit(0 if all(splits) and cuda and sorted(sum(splits, [])) == sorted(every) else 1)
' "${TRITON_DTYPES[@]}"
}

rehearse_tests() {  # the two selections split tests/test_cuda.py: every case in one of them
    local tmp all tests big
    tmp=$(mktemp -d)
    collected tests/test_cuda.py > "$tmp/all" &  # three collections at once: ~15 s each
    collected "${TESTS[@]}" > "$tmp/tests" &
    collected "${BIG[@]}" > "$tmp/big"
    wait
    read -r all < "$tmp/all"; read -r tests < "$tmp/tests"; read -r big < "$tmp/big"
    rm -rf "$tmp"
    echo "tests: $tests cases, big: $big cases (expected $BIG_CASES), tests/test_cuda.py: $all cases"
    [ "$tests" -gt 0 ] && [ "$big" -eq "$BIG_CASES" ] && [ $(( tests + big )) -eq "$all" ]
}

rehearse_memcheck() {  # the command lines; the filters must name every kernel of this project
    local backend
    for backend in cuda triton; do
        echo "${SANITIZER[*]} --kernel-name $(sanitizer_filter "$backend")" \
             "$PY scripts/run_each_kernel.py --backend $backend --dtype float32"
    done
    local missing
    missing=$(grep -L "namespace uresnet" csrc/cuda/*.cu)
    [ -z "$missing" ] || { echo "not in namespace uresnet (kns=uresnet misses them): $missing"; return 1; }
    "$PY" - "$(triton_kernel_regex)" <<'EOF'
import importlib, pkgutil, re, sys
import uresnet_ops.triton as package
pattern = re.compile(sys.argv[1][len("regex="):] if sys.argv[1].startswith("regex=") else sys.argv[1])
names = {name for info in pkgutil.iter_modules(package.__path__)
         for name, obj in vars(importlib.import_module(f"{package.__name__}.{info.name}")).items()
         if name.endswith("_kernel") and hasattr(obj, "run")}
missed = sorted(name for name in names if not pattern.fullmatch(name))
print(f"triton filter: {len(names)} kernels; missed: {missed or 'none'}")
sys.exit(1 if missed or not names or pattern.fullmatch("vectorized_elementwise_kernel") else 0)
EOF
}

rehearse_bench() {  # one shape per op, each backend (as collected on the GPU machine)
    local select labels
    select=$(bench_select) || return 1
    echo "bench: -k '$select'"
    labels=$(PYTHONPATH=scripts${PYTHONPATH:+:$PYTHONPATH} "${BENCH[@]}" -p collect_as_on_cuda -k "$select" \
             --collect-only 2>&1 | grep "::" | tee /dev/stderr |
             sed -E 's/.*::test_([a-z0-9_]+)\[(.*)-train_fwdbwd-.*/\1 \2/' | sort -u)
    echo "$labels"
    [ "$(echo "$labels" | grep -c .)" -eq "${#OPS[@]}" ] && [ "$(echo "$labels" | cut -d' ' -f1 | sort -u | wc -l)" -eq "${#OPS[@]}" ]
}

rehearse_files() {  # what would come back: at most 8 files, names the tool accepts
    echo "files: ${#OUT_FILES[@]} (${OUT_FILES[*]})"
    [ "${#OUT_FILES[@]}" -le 8 ] && ! printf '%s\n' "${OUT_FILES[@]}" | grep -q '[^A-Za-z0-9._-]'
}

# ---- Running the steps -----------------------------------------------------------------------
START=$SECONDS
failed=0

# step NAME LIMIT LOG: run the function NAME (in a child bash) under `timeout LIMIT`, capped by what
# is left of TOTAL, its output appended to $OUT/LOG.
step() {
    local name=$1 limit=$2 log=$3
    local left=$(( TOTAL - (SECONDS - START) ))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$MODE" = dry ]; then
        echo "[$name] limit ${limit}s, output to \$OUT/$log:"
        declare -f "$name" | sed -n '3,$p' | sed '$d'
        return 0
    fi
    if [ "$limit" -le 5 ]; then
        echo "[$name] skipped: no time left"
        failed=1
        return 1
    fi
    local t0=$SECONDS status
    timeout --signal=INT --kill-after=10 "$limit" bash "$SELF" --step "$name" >> "$OUT/$log" 2>&1
    status=$?
    [ "$status" -eq 124 ] && echo "[$name] stopped at its ${limit}s limit"
    echo "[$name] exit $status after $(( SECONDS - t0 ))s; last lines of $OUT/$log:"
    tail -4 "$OUT/$log" | sed 's/^/    /'
    [ "$status" -eq 0 ] || failed=1
    return "$status"
}

rehearse() {  # each part timed; the summary's last line says whether all passed
    local part t0 status parts=("$@")
    [ "${#parts[@]}" -gt 0 ] || parts=(build kernels tests memcheck bench files)
    for part in "${parts[@]}"; do
        declare -F "rehearse_$part" > /dev/null || { echo "gpu_check: no rehearsal part '$part'" >&2; exit 2; }
    done
    for part in "${parts[@]}"; do
        t0=$SECONDS
        echo "[rehearse $part]"
        "rehearse_$part" 2>&1 | sed 's/^/    /'
        status=${PIPESTATUS[0]}
        echo "[rehearse $part] $([ "$status" -eq 0 ] && echo ok || echo FAILED) in $(( SECONDS - t0 ))s"
        [ "$status" -eq 0 ] || failed=1
    done
    rm -rf "$OUT"
    echo "gpu_check --rehearse: $([ "$failed" -eq 0 ] && echo "every step passed" || echo FAILED) in $(( SECONDS - START ))s"
    exit "$failed"
}

if [ "${1:-}" = "--step" ]; then  # one step, run by step() under its time limit
    "$2"
    exit $?
fi
[ "$MODE" = rehearse ] && rehearse "${@:2}"

main() {
    local build_pid=""
    if [ "$MODE" = dry ]; then
        step build 220 build.log
    else
        step build 220 build.log &  # beside it: the Triton kernels, which need no extension
        build_pid=$!
    fi
    step kernels_triton 150 kernels.log
    [ -z "$build_pid" ] || wait "$build_pid" || { echo "gpu_check: build failed, stopping"; exit 1; }
    step kernels_cuda 60 kernels.log
    step tests 150 tests.log
    step big 75 big.log
    step memcheck 80 memcheck.log
    step bench 60 bench.log
    echo "gpu_check: finished in $(( SECONDS - START ))s, $([ "$failed" -eq 0 ] && echo "every step passed" || echo "FAILED")"
    return "$failed"
}
[ "$MODE" = run ] && rm -f "${OUT_FILES[@]/#/$OUT/}"
main 2>&1 | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
