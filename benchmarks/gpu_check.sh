#!/usr/bin/env bash
# The whole GPU validation in one call, on a machine with a CUDA GPU and no network:
#   0. install the carried wheels (.whl/, made by benchmarks/gpu_bundle.sh) that the
#      machine's Python lacks: pytest, tqdm, matplotlib, liger-kernel,
#   1. build the C++/CUDA extension in place, for this card's architecture only
#      (TORCH_CUDA_ARCH_LIST, e.g. 9.0 on an H100/H200),
#   2. run the CUDA-device tests (pytest -k cuda), failures and errors listed (-rfE),
#   3. run the headline sweep: bf16; forward_kl and jsd; forward+backward; KDLoss on logits,
#      then FusedLinearKDLoss (H_s=2048, H_t=4096); V in 128k, 32k, 256k at N=8192 and N in
#      1k, 16k at V=128256; the torch.compile rows last,
#   4. run the rest of the tests if time is left,
#   5. write bench.json, bench.md (tables, measured over expected per case from
#      benchmarks/expected_times.py, build and test status), plot-*.png and check.log into
#      PARENT/<card>-<date>/ (PARENT defaults to benchmarks/results), and print measured
#      over expected before the summary.
#
# Usage:  bash benchmarks/gpu_check.sh [PARENT]
#
# Budget: FASTKD_CHECK_BUDGET seconds in all (default 480 = 8 minutes, for a 10-minute call
# on an H100/H200), the one knob: every step's limit is a share of it.
#
#   step            limit                               at 480 s   expected on an H100
#   0 wheels        none (pip, no network)              -          ~5 s
#   1 build         25% of the budget                   120 s      ~1 min (one arch, nproc jobs;
#                                                                  2 cores here: 1.5 min, 2 archs)
#   2 CUDA tests    30% of the budget                   144 s      ~1700 tests; as many as fit
#   3 sweep logits  55% of what is left, at most 25%    <= 120 s   ~70 measurements, ~1 s each
#     sweep fused   what is left, at most 20%           <=  96 s   ~60 measurements
#   4 other tests   what is left                        the rest   CPU-side; CI runs them too
#   5 report        kept back from every step: 5% of    39 s       ~10 s
#                   the budget (20 s at least) + 15 s
#                   between SIGINT and SIGKILL
# Every limit is also at most what is left less the report's share; time a step does not use
# goes to the later ones.
#
# A step stopped at its limit gets SIGINT (timeout -s INT; SIGKILL 15 s later), so pytest
# prints its summary and the sweep writes its tables; the sweep also stops starting new
# measurements at 75% of its limit and writes its JSON after every case.
#
# Exit status 0 only if: the build succeeded with build_info()["cuda_kernels"] True, at least
# one CUDA-device test ran (parametrised on the cuda device, not skipped) and none failed, the
# CUDA tests finished in their limit, no other test failed, and the sweep wrote results with
# no fastkd row wrong or in error. The summary at the end lists every reason it is not 0.
#
# Environment: PYTHON (default python3), FASTKD_CHECK_BUDGET (seconds),
# FASTKD_CHECK_STEPS=build,cudatests,bench,tests (the default; drop some to skip them),
# FASTKD_WHEELS (default .whl), FASTKD_CHECK_SWEEP / FASTKD_CHECK_HIDDEN (the sweep's
# options), FASTKD_CHECK_ALLOW_CPU=1 (a dry run of the plumbing on a machine without a GPU:
# the two GPU checks are reported, not enforced), TORCH_CUDA_ARCH_LIST, MAX_JOBS.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
BUDGET=${FASTKD_CHECK_BUDGET:-480}
STEPS=${FASTKD_CHECK_STEPS:-build,cudatests,bench,tests}
WHEELS=${FASTKD_WHEELS:-.whl}
DRY=${FASTKD_CHECK_ALLOW_CPU:-0}
START=$SECONDS
GRACE=15 # a step's SIGKILL comes this long after its SIGINT
# Kept back from every step: the report (~10 s; 20 s on 2 busy cores) and the last step's
# grace after its SIGINT.
RESERVE=$((BUDGET * 5 / 100))
[ "$RESERVE" -lt 20 ] && RESERVE=20
RESERVE=$((RESERVE + GRACE))
export PYTHONUNBUFFERED=1
has_step() { [[ ",$STEPS," == *",$1,"* ]]; }
left() { echo $((BUDGET - (SECONDS - START))); }
# limit PCT [OF]: PCT% of OF (default: the budget), at most what is left less the report's
# reserve, at least 1.
limit() {
    local t=$((${2:-$BUDGET} * $1 / 100)) most=$(($(left) - RESERVE))
    [ "$t" -gt "$most" ] && t=$most
    [ "$t" -lt 1 ] && t=1
    echo "$t"
}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
FAILURES=()
LOG=/dev/null
note() { echo "$*" | tee -a "$LOG"; }
fail() {
    FAILURES+=("$*")
    note "FAIL: $*"
}
# gpu_fail MESSAGE: a failure on a GPU; in a dry run only reported.
gpu_fail() {
    if [ "$DRY" = 1 ]; then note "dry run, not enforced: $*"; else fail "$*"; fi
}

# 0. carried wheels: those whose distribution the machine's Python lacks, installed into a
# temporary folder put on PYTHONPATH; what the machine has (torch, triton...) stays.
WHEELS_LINE="wheels: none carried ($WHEELS/*.whl)"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    mapfile -t MISSING < <("$PY" - "$WHEELS"/*.whl <<'EOF'
import importlib.metadata as md
import os
import sys

for wheel in sys.argv[1:]:
    try:
        md.distribution(os.path.basename(wheel).split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)
EOF
    )
    if [ ${#MISSING[@]} -eq 0 ]; then
        WHEELS_LINE="wheels: all $(compgen -G "$WHEELS/*.whl" | wc -l) already installed"
    elif "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" \
        --no-deps --no-compile --no-cache-dir --target "$TMP/site" "${MISSING[@]}" \
        >"$TMP/wheels.log" 2>&1; then
        export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
        WHEELS_LINE="wheels: installed$(for w in "${MISSING[@]}"; do printf ' %s' "$(basename "$w" | cut -d- -f1-2)"; done)"
    else
        WHEELS_LINE="wheels: INSTALL FAILED: $(tail -3 "$TMP/wheels.log" | tr '\n' ' ')"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "gpu_check: FAIL: $PY cannot import torch (PYTHON= names another Python)" >&2
    exit 1
elif "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    CARD=$("$PY" -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
    ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
    DRY=0
elif [ "$DRY" = 1 ]; then
    CARD=cpu-dry-run
    ARCH=none
else
    echo "gpu_check: FAIL: torch sees no CUDA device (FASTKD_CHECK_ALLOW_CPU=1: a dry run)" >&2
    exit 1
fi
RESULTS="${1:-benchmarks/results}/$CARD-$(date -u +%Y-%m-%d)"
mkdir -p "$RESULTS"
LOG="$RESULTS/check.log"
: >"$LOG"
note "gpu_check: $CARD (sm_$ARCH), budget ${BUDGET}s, steps $STEPS, results in $RESULTS"
note "$WHEELS_LINE"
[ -f "$TMP/wheels.log" ] && cat "$TMP/wheels.log" >>"$LOG"
if command -v nvidia-smi >/dev/null; then nvidia-smi >>"$LOG" 2>&1; fi
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda)" 2>&1 | tee -a "$LOG"

# 1. build
step=$SECONDS
BUILD_RC="not run"
if has_step build; then
    lim=$(limit 25)
    MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout -s INT -k "$GRACE" "$lim" \
        "$PY" setup.py build_ext --inplace >"$TMP/build.log" 2>&1
    BUILD_RC=$?
    cat "$TMP/build.log" >>"$LOG"
    [ "$BUILD_RC" = 124 ] && BUILD_RC="124 (stopped at its ${lim}s limit)"
    # setup.py's own lines (what is built, what is skipped), once each, in order
    grep -E "^fastkd: " "$TMP/build.log" | awk '!seen[$0]++' | tee -a "$LOG"
    [ "$BUILD_RC" = 0 ] || fail "build: rc=$BUILD_RC (the compiler's output is in check.log)"
fi
BUILD_INFO=$("$PY" -c "import fastkd; print(fastkd.build_info())" 2>&1 | tail -1)
CUDA_KERNELS=$("$PY" -c "import fastkd; print(fastkd.build_info().get('cuda_kernels'))" 2>/dev/null)
note "build: rc=$BUILD_RC in $((SECONDS - step))s; build_info: $BUILD_INFO"
[ "$CUDA_KERNELS" = True ] || gpu_fail "build_info()['cuda_kernels'] is ${CUDA_KERNELS:-unknown}: no CUDA kernels"

# 2. and 4. tests: pytest under `timeout -s INT` (it then prints its summary), a junit xml
# counted by junit_counts: "tests passed failed errors skipped cuda_ran cuda_passed".
junit_counts() {
    "$PY" - "$1" <<'EOF'
import re
import sys
import xml.etree.ElementTree as ET

try:
    cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
except (OSError, ET.ParseError):
    cases = []
n = dict(passed=0, failed=0, errors=0, skipped=0, cuda_ran=0, cuda_passed=0)
for case in cases:
    kids = {child.tag for child in case}
    outcome = (
        "failed" if "failure" in kids else "errors" if "error" in kids
        else "skipped" if "skipped" in kids else "passed"
    )
    n[outcome] += 1
    # A CUDA-device test: parametrised on the cuda device ("[triton-cuda-...]"), not skipped.
    if re.search(r"\[.*\bcuda\b.*\]", case.get("name", "")) and outcome != "skipped":
        n["cuda_ran"] += 1
        n["cuda_passed"] += outcome == "passed"
print(len(cases), *n.values())
EOF
}
# run_tests NAME SECONDS PYTEST-ARGS...: sets RC, COUNTS (as above), SUMMARY.
run_tests() {
    local name=$1 lim=$2
    shift 2
    timeout -s INT -k "$GRACE" "$lim" "$PY" -m pytest -q -p no:cacheprovider -rfE \
        --junitxml="$TMP/$name.xml" "$@" tests/ 2>&1 | tee "$TMP/$name.log" >>"$LOG"
    RC=${PIPESTATUS[0]}
    read -r -a COUNTS <<<"$(junit_counts "$TMP/$name.xml")"
    SUMMARY=$(grep -E "[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran|Interrupted" \
        "$TMP/$name.log" | tail -1)
    [ "$RC" = 124 ] && SUMMARY="STOPPED at its ${lim}s limit; $SUMMARY"
    # -rfE's short summary: the failures' names, also on the terminal.
    sed -n '/short test summary info/,$p' "$TMP/$name.log" | grep -E "^(FAILED|ERROR)" | head -20
}

step=$SECONDS
CUDA_LINE="CUDA tests: not run"
if has_step cudatests; then
    if ! "$PY" -c "import pytest" 2>/dev/null; then
        fail "pytest is not importable: carry the wheels of benchmarks/gpu_bundle.sh in $WHEELS"
    else
        run_tests cuda "$(limit 30)" -k cuda
        c=("${COUNTS[@]}")
        CUDA_LINE="CUDA tests: rc=$RC in $((SECONDS - step))s: ${c[6]:-0} ran on the CUDA device, ${c[7]:-0} passed; all -k cuda: ${c[0]:-0} selected, ${c[1]:-0} passed, ${c[2]:-0} failed, ${c[3]:-0} errors, ${c[4]:-0} skipped | $SUMMARY"
        note "$CUDA_LINE"
        [ "${c[6]:-0}" -gt 0 ] || gpu_fail "no CUDA-device test ran"
        [ $((${c[2]:-0} + ${c[3]:-0})) -eq 0 ] || fail "CUDA tests: ${c[2]:-0} failed, ${c[3]:-0} errors"
        [ "$RC" = 124 ] && gpu_fail "CUDA tests stopped at their time limit: not all ran"
        case $RC in 0 | 1 | 5 | 124) ;; *) fail "CUDA tests: pytest rc=$RC" ;; esac
    fi
fi

# 3. the sweeps. --time-limit stops new measurements at 75% of the step's limit; SIGINT at
# the limit makes it report what it measured; its JSON is rewritten after every case.
# FASTKD_CHECK_SWEEP replaces these options (e.g. a tiny sweep for a dry run).
read -r -a SWEEP <<<"${FASTKD_CHECK_SWEEP:---dtype bfloat16 --divergence forward_kl,jsd --mode fwd+bwd --impl fastkd-triton*,fastkd-cuda*,torch-*,liger* --sweep star --tokens 8192,1024,16384 --vocab 128256,32000,256000}"
JSONS=()
BENCH_LINES=()
bench() { # bench NAME SECONDS ARGS...
    local name=$1 lim=$2 json="$RESULTS/bench-$1.json"
    shift 2
    step=$SECONDS
    if ! has_step bench || [ "$lim" -lt 20 ]; then
        BENCH_LINES+=("bench $name: not run (${lim}s; steps: $STEPS)")
        note "${BENCH_LINES[-1]}"
        return
    fi
    timeout -s INT -k "$GRACE" "$lim" "$PY" -m fastkd.bench "${SWEEP[@]}" "$@" \
        --time-limit $((lim * 3 / 4)) --json "$json" >>"$LOG" 2>&1
    local rc=$?
    [ -f "$json" ] && JSONS+=("$json")
    BENCH_LINES+=("bench $name: rc=$rc in $((SECONDS - step))s (limit ${lim}s)")
    note "${BENCH_LINES[-1]}"
    case $rc in 0 | 124 | 130) ;; *) fail "bench $name: rc=$rc" ;; esac
}
# at_most A B: the smaller.
at_most() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
bench logits "$(at_most "$(limit 55 $(($(left) - RESERVE)))" "$(limit 25)")"
read -r -a HIDDEN <<<"${FASTKD_CHECK_HIDDEN:---hidden 2048 --teacher-hidden 4096}"
bench fused "$(limit 20)" --fused-linear "${HIDDEN[@]}"

# 4. the other tests, with what is left
step=$SECONDS
REST_LINE="other tests: not run"
if has_step tests && [ "$(limit 100)" -ge 30 ] && "$PY" -c "import pytest" 2>/dev/null; then
    run_tests rest "$(limit 100)" -k "not cuda"
    c=("${COUNTS[@]}")
    REST_LINE="other tests: rc=$RC in $((SECONDS - step))s: ${c[0]:-0} reached, ${c[1]:-0} passed, ${c[2]:-0} failed, ${c[3]:-0} errors, ${c[4]:-0} skipped | $SUMMARY"
    note "$REST_LINE"
    [ $((${c[2]:-0} + ${c[3]:-0})) -eq 0 ] || fail "other tests: ${c[2]:-0} failed, ${c[3]:-0} errors"
elif has_step tests; then
    REST_LINE="other tests: not run ($(left)s left; CI runs them)"
    note "$REST_LINE"
fi

# 5. one JSON, one markdown page, the plots; the parts are removed once merged.
BENCH_COUNTS="no benchmark results"
if [ ${#JSONS[@]} -gt 0 ]; then
    if "$PY" -m fastkd.bench --from-json "${JSONS[@]}" --json "$RESULTS/bench.json" \
        --markdown "$RESULTS/bench.md" --plot "$RESULTS/plot.png" >"$TMP/report.out" 2>>"$LOG"; then
        rm -f "${JSONS[@]}"
    else
        fail "the report from the sweeps' JSON failed (see check.log)"
    fi
    cat "$TMP/report.out" >>"$LOG"
    BENCH_COUNTS=$("$PY" - "$RESULTS/bench.json" "${JSONS[@]}" <<'EOF'
import collections
import json
import os
import sys

paths = [p for p in sys.argv[1:] if os.path.exists(p)]
rows = [r for p in paths[:1] for r in json.load(open(p))["results"]]
count = collections.Counter(
    r["status"] + (" (time limit)" if r.get("reason") == "time limit reached" else "")
    for r in rows
)
bad = [
    f'{r["implementation"]} {r["divergence"]} N={r["tokens"]} V={r["vocab"]}: {r["status"]}'
    for r in rows
    if r["implementation"].startswith("fastkd-") and r["status"] in ("wrong", "error")
]
print(f"bench: {len(rows)} rows: " + ", ".join(f"{n} {s}" for s, n in sorted(count.items())))
for line in bad:
    print("FASTKD-BAD " + line)
EOF
    )
    grep -q "^FASTKD-BAD" <<<"$BENCH_COUNTS" && fail "fastkd rows wrong or in error: $(grep -c "^FASTKD-BAD" <<<"$BENCH_COUNTS")"
    # measured over expected per case: docs/performance.md's bytes at the copy bandwidth
    if [ -f "$RESULTS/bench.json" ] && "$PY" benchmarks/expected_times.py "$RESULTS/bench.json" \
        >"$TMP/expected.md" 2>>"$LOG"; then
        cat "$TMP/expected.md" >>"$RESULTS/bench.md"
        cat "$TMP/expected.md" >>"$LOG"
    else
        fail "benchmarks/expected_times.py failed (see check.log)"
    fi
elif has_step bench; then
    fail "no benchmark results were written"
fi

# The summary: last, so it is what a terminal or the device tool's output tail shows.
VERDICT="PASS"
[ ${#FAILURES[@]} -gt 0 ] && VERDICT="FAIL"
[ "$DRY" = 1 ] && VERDICT="$VERDICT (CPU dry run)"
{
    echo
    echo "## gpu_check summary: $VERDICT"
    echo
    echo "- card: $CARD (sm_$ARCH); $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- $WHEELS_LINE"
    echo "- build: rc=$BUILD_RC; build_info: $BUILD_INFO"
    echo "- $CUDA_LINE"
    for line in "${BENCH_LINES[@]}"; do echo "- $line"; done
    echo "- $REST_LINE"
    echo "- ${BENCH_COUNTS//$'\n'/$'\n'- }"
    for f in "${FAILURES[@]}"; do echo "- FAIL: $f"; done
    echo "- gpu_check.sh took $((SECONDS - START)) s of its ${BUDGET} s budget; files in $RESULTS:"
    find "$RESULTS" -type f | sort | sed 's/^/  - /'
} >"$TMP/summary.md"
[ -f "$RESULTS/bench.md" ] && cat "$TMP/summary.md" >>"$RESULTS/bench.md"
cat "$TMP/report.out" 2>/dev/null
cat "$TMP/expected.md" 2>/dev/null
tee -a "$LOG" <"$TMP/summary.md"
[ ${#FAILURES[@]} -eq 0 ]
