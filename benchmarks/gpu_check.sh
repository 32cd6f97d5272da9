#!/usr/bin/env bash
# The whole GPU validation in one call, on a machine with a CUDA GPU and no network:
#   1. build the C++/CUDA extension in place (for this card's architecture only, to save time),
#   2. run the test suite (tests/) with the GPU present,
#   3. run the benchmark sweep: bf16; forward_kl and jsd; KDLoss on logits and
#      FusedLinearKDLoss; V in 32k, 128k, 256k at N = 8k, and N in 1k, 8k, 16k at V = 128k,
#   4. write bench.json, bench.md (tables, build and test status) and plots into
#      PARENT/<card>-<date>/ (PARENT defaults to benchmarks/results).
#
# Usage:  bash benchmarks/gpu_check.sh [PARENT]
# Budget: 8 minutes in all on an H100 (FASTKD_CHECK_BUDGET=seconds changes it). Each step gets
# what is left; the sweeps stop starting new measurements in time to write their files, and
# what they did not reach is listed as "skipped: time limit reached".
# FASTKD_CHECK_STEPS=build,tests,bench (the default) picks the steps.
# Liger-Kernel, when it is not installed, can travel as a wheel: put it in .whl/ at the
# repository root (see benchmarks/README.md); it is installed into a temporary folder here.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
BUDGET=${FASTKD_CHECK_BUDGET:-480}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
# share PERCENT CAP: that percentage of the time left, at most CAP seconds, at least 1.
share() {
    local t=$(($(left) * $1 / 100))
    [ "$t" -gt "$2" ] && t=$2
    [ "$t" -lt 1 ] && t=1
    echo "$t"
}
STEPS=${FASTKD_CHECK_STEPS:-build,tests,bench}

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    CARD=$("$PY" -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
    ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
elif [ "${FASTKD_CHECK_ALLOW_CPU:-0}" = 1 ]; then
    # A dry run of the plumbing on a machine without a GPU (with a small FASTKD_CHECK_SWEEP).
    CARD=cpu-dry-run
    ARCH=none
else
    echo "gpu_check: torch sees no CUDA device; nothing to check" >&2
    exit 1
fi
OUT="${1:-benchmarks/results}/$CARD-$(date -u +%Y-%m-%d)"
mkdir -p "$OUT"
LOG="$OUT/check.log"
TMP=$(mktemp -d)
: >"$LOG"
note() { echo "$*" | tee -a "$LOG"; }

note "gpu_check: $CARD (sm_$ARCH), budget ${BUDGET}s, results in $OUT"
if command -v nvidia-smi >/dev/null; then nvidia-smi >>"$LOG" 2>&1; fi

# 0. carried wheels (Liger-Kernel): installed beside, never over, the image's packages.
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$TMP/site" .whl/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
        note "wheels: installed" .whl/*.whl
    else
        note "wheels: install failed (see log); going on without them"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 1. build
step=$SECONDS
BUILD_RC="not run"
if [[ $STEPS == *build* ]]; then
    MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        timeout "$(share 35 200)" "$PY" setup.py build_ext --inplace >>"$LOG" 2>&1
    BUILD_RC=$?
fi
BUILD_INFO=$("$PY" -c "import fastkd; print(fastkd.build_info())" 2>&1 | tail -1)
note "build: rc=$BUILD_RC in $((SECONDS - step))s; $BUILD_INFO"

# 2. tests (whatever the build gave: a failed build leaves Triton and the reference to test)
step=$SECONDS
TESTS_RC="not run"
TESTS_SUMMARY=""
if [[ $STEPS == *tests* ]]; then
    timeout "$(share 35 180)" "$PY" -m pytest -q -p no:cacheprovider tests/ >"$TMP/tests.log" 2>&1
    TESTS_RC=$?
    cat "$TMP/tests.log" >>"$LOG"
    TESTS_SUMMARY=$(grep -E "passed|failed|error" "$TMP/tests.log" | tail -1)
    [ "$TESTS_RC" -eq 124 ] && TESTS_SUMMARY="stopped at its time limit; $TESTS_SUMMARY"
fi
note "tests: rc=$TESTS_RC in $((SECONDS - step))s: $TESTS_SUMMARY"

# 3. the sweeps. --time-limit stops new measurements; the outer timeout is the hard stop
# (one measurement in flight, a torch.compile say, plus writing the JSON).
# FASTKD_CHECK_SWEEP replaces these options (e.g. a tiny sweep for a dry run).
read -r -a SWEEP <<<"${FASTKD_CHECK_SWEEP:---dtype bfloat16 --divergence forward_kl,jsd --sweep star --tokens 8192,1024,16384 --vocab 128256,32000,256000}"
bench() {  # bench NAME SECONDS ARGS...
    local name=$1 limit=$2
    shift 2
    step=$SECONDS
    if [[ $STEPS != *bench* ]] || [ "$limit" -lt 30 ]; then
        note "bench $name: not run (${limit}s left; steps: $STEPS)"
        return
    fi
    timeout $((limit + 60)) "$PY" -m fastkd.bench "${SWEEP[@]}" "$@" --time-limit "$limit" \
        --json "$TMP/$name.json" >"$TMP/$name.out" 2>>"$LOG"
    local rc=$?
    cat "$TMP/$name.out" >>"$LOG"
    note "bench $name: rc=$rc in $((SECONDS - step))s"
}
bench logits $(($(left) * 45 / 100 - 60))
read -r -a HIDDEN <<<"${FASTKD_CHECK_HIDDEN:---hidden 2048 --teacher-hidden 4096}"
bench fused $(($(left) - 90)) --fused-linear "${HIDDEN[@]}"

# 4. one JSON, one markdown page, the plots
JSONS=()
for f in "$TMP/logits.json" "$TMP/fused.json"; do [ -f "$f" ] && JSONS+=("$f"); done
if [ ${#JSONS[@]} -gt 0 ]; then
    "$PY" -m fastkd.bench --from-json "${JSONS[@]}" --json "$OUT/bench.json" \
        --markdown "$OUT/bench.md" --plot "$OUT/plot.png" >"$TMP/report.out" 2>>"$LOG"
    cat "$TMP/report.out"
    {
        echo
        echo "## Build and tests"
        echo
        echo "- build: rc=$BUILD_RC; $BUILD_INFO"
        echo "- tests: rc=$TESTS_RC: $TESTS_SUMMARY"
        echo "- gpu_check.sh took $((SECONDS - START)) s of its ${BUDGET} s budget"
    } >>"$OUT/bench.md"
else
    note "no benchmark results were written"
fi
note "gpu_check: done in $((SECONDS - START))s; files in $OUT:"
find "$OUT" -type f | sort | tee -a "$LOG"
rm -rf "$TMP"
[ "$BUILD_RC" = 0 ] && [ "$TESTS_RC" = 0 ] && [ ${#JSONS[@]} -gt 0 ]
