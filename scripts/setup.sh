#!/usr/bin/env bash
# Make .venv with Loom and its test tools. Idempotent: a second run is quick.
# torch is installed first and pinned here (2.13.0, a CPU build on machines
# that have one on disk); pyproject.toml itself accepts newer releases.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${LOOM_TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
fi
stamp=.venv/.loom-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip install --quiet --disable-pip-version-check -e ".[test]"
  touch "$stamp"
fi
