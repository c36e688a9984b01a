#!/usr/bin/env bash
# The one command for a lent GPU (tools/gpu/README.md): runs tools/gpu/gpu_suite.py, which installs the wheels
# carried in .whl/ and writes the report.
#
#   bash tools/gpu/gpu_suite.sh [--smoke] [--out DIR] [--only STEP ...] [--timeout NAME=SECONDS] [--budget SECONDS]
#   bash tools/gpu/gpu_suite.sh --wheels [xformers]   # here, where pip reaches PyPI: wheels the GPU machine lacks -> .whl/
#
# PYTHON picks the interpreter (default python3).
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" > /dev/null || { echo "error: PYTHON=$PYTHON is not a command" >&2; exit 2; }

if [[ "${1:-}" == "--wheels" ]]; then
    # The GPU machine has torch, accelerate, numpy, ... but not omegaconf (which needs only PyYAML, present there).
    # "--wheels xformers" adds xformers 0.0.35 (3 MB, torch>=2.10), the optional fastest packed attention.
    shift
    version=$("$PYTHON" -c "import omegaconf; print(omegaconf.__version__)" 2>/dev/null || echo 2.4.0)
    wheels=("omegaconf==$version")
    for extra in "$@"; do
        [[ "$extra" == xformers ]] || { echo "error: --wheels takes only 'xformers' as an extra, got '$extra'" >&2; exit 2; }
        wheels+=("xformers==0.0.35")
    done
    mkdir -p "$repo/.git/info" && { grep -qxF '/.whl/' "$repo/.git/info/exclude" 2>/dev/null \
        || echo '/.whl/' >> "$repo/.git/info/exclude"; }
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$repo/.whl" "${wheels[@]}"
fi
exec "$PYTHON" "$repo/tools/gpu/gpu_suite.py" "$@"
