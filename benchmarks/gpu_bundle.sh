#!/usr/bin/env bash
# The wheels gpu_check.sh needs on a GPU machine without network, fetched here (with PyPI)
# into .whl/ at the repository root (ignored by git: never commit wheels).
#
# For CPython 3.12, manylinux x86-64 (the GPU image's Python), whatever this machine runs:
#   pytest and its dependencies   the test suite (required: gpu_check.sh fails without pytest)
#   tqdm                          fastkd.bench's progress bar (a fastkd dependency)
#   matplotlib and its deps       bench plots (optional), numpy excepted unless --numpy
#   liger-kernel (no deps)        the Liger-Kernel rows of the sweep (optional)
# About 26 MiB in all (numpy adds 16 MiB), under the device tool's 64 MiB `carry`.
# gpu_check.sh installs only the ones the machine's Python lacks (pip --no-index, into a
# temporary folder on PYTHONPATH: torch, triton and anything else there stay the machine's).
#
# Usage:  bash benchmarks/gpu_bundle.sh [--numpy] [--no-plots] [--no-liger] [DIR]
#   DIR defaults to .whl (the folder gpu_check.sh reads; FASTKD_WHEELS there too).
#   PYTHON (default python3) is the pip that downloads; any version works.
set -euo pipefail

cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
NUMPY=0
PLOTS=1
LIGER=1
DIR=.whl
for arg in "$@"; do
    case $arg in
        --numpy) NUMPY=1 ;;
        --no-plots) PLOTS=0 ;;
        --no-liger) LIGER=0 ;;
        -h | --help)
            sed -n '2,17p' "$0"
            exit 0
            ;;
        -*)
            echo "gpu_bundle: unknown option $arg" >&2
            exit 2
            ;;
        *) DIR=$arg ;;
    esac
done

# pip matches each manylinux tag exactly: name every one a current wheel may carry.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312)
for tag in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64; do
    TARGET+=(--platform "$tag")
done

# Pins: one version of each (two in the folder would stop the install there).
TESTS=("pytest>=8,<10" "tqdm>=4.60")
PLOT=("matplotlib>=3.8,<4")
LIGER_PIN="liger-kernel==0.8.5"

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
want=("${TESTS[@]}")
[ "$PLOTS" = 1 ] && want+=("${PLOT[@]}")
[ "$NUMPY" = 1 ] && want+=(numpy)
"$PY" -m pip download -q --disable-pip-version-check "${TARGET[@]}" -d "$DIR" "${want[@]}"
if [ "$NUMPY" = 0 ]; then
    # matplotlib needs numpy, which GPU images have beside torch; --numpy brings it.
    rm -f "$DIR"/numpy-*.whl
fi
if [ "$LIGER" = 1 ]; then
    # Its dependencies are torch and triton: the machine's own, never carried.
    "$PY" -m pip download -q --disable-pip-version-check --no-deps "${TARGET[@]}" -d "$DIR" \
        "$LIGER_PIN"
fi

{
    echo "# fastkd gpu bundle: CPython 3.12 manylinux x86-64 wheels for benchmarks/gpu_check.sh"
    echo "# made $(date -u +%Y-%m-%dT%H:%M:%SZ) by benchmarks/gpu_bundle.sh $*"
    for whl in "$DIR"/*.whl; do
        printf '%8d kB  %s\n' $(($(stat -c %s "$whl") / 1024)) "$(basename "$whl")"
    done
} >"$DIR/BUNDLE.txt"
cat "$DIR/BUNDLE.txt"
size=$(du -sk "$DIR" | cut -f1)
echo "gpu_bundle: $DIR holds $(find "$DIR" -type f -name '*.whl' | wc -l) wheels, $((size / 1024)) MiB"
if [ "$size" -gt $((60 * 1024)) ]; then
    echo "gpu_bundle: over 60 MiB: too large for the device tool's 64 MiB carry" >&2
    exit 1
fi
