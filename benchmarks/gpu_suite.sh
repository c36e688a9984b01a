#!/usr/bin/env bash
# The one command for a lent GPU (benchmarks/README.md): installs the wheels carried in .whl/, then runs
# benchmarks/gpu_suite.py, which writes the report.
#
#   bash benchmarks/gpu_suite.sh [--smoke] [--out DIR] [--only STEP ...] [--timeout NAME=SECONDS] [--budget SECONDS]
#   bash benchmarks/gpu_suite.sh --wheels [xformers]   # here, where pip reaches PyPI: wheels the GPU machine lacks -> .whl/
#
# PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

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
    mkdir -p .git/info && { grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; }
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    site=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite_site.XXXXXX")
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "error: the wheels in .whl/ did not install" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    GPU_SUITE_WHEELS="$(cd .whl && ls -- *.whl | tr '\n' ' ')"
    export GPU_SUITE_WHEELS
fi
"$PYTHON" -c "import omegaconf" 2>/dev/null \
    || echo "warning: omegaconf is missing, so every project script will fail; carry it: bash benchmarks/gpu_suite.sh --wheels" >&2
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
