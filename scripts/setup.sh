#!/usr/bin/env bash
# Sets up .venv/ with this project and its test extras; safe to run again (it only adds what is
# missing). torch is installed first, pinned to the CPU build that lies on this machine kind's
# disk (an unpinned torch would pull a 5 GB CUDA build); set TORCH_SPEC to choose another, e.g.
# TORCH_SPEC="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128" on a GPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0} 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, ray, mlflow, diffusers, orchestrator" \
  || { echo "setup failed: the environment in .venv does not import" >&2; exit 1; }
echo "ready: $(.venv/bin/python -c 'import torch, ray, mlflow; print(f"torch {torch.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}")')"
