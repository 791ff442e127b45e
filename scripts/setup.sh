#!/usr/bin/env bash
# Sets up .venv/ with this project and its test extras at the exact versions of requirements.lock
# (what CI tested); safe to run again. torch is installed first, pinned to the CPU build that lies
# on this machine kind's disk (an unpinned torch would pull a 5 GB CUDA build); set TORCH_SPEC to
# choose another, e.g. TORCH_SPEC="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"
# on a GPU box. The project itself is installed editable without resolving anything again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
quiet() { "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
quiet .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  quiet .venv/bin/python -m pip install -q --disable-pip-version-check ${TORCH_SPEC:-torch==2.13.0}
fi
quiet .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock
quiet .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
.venv/bin/python -c "import torch, ray, mlflow, diffusers, optuna, orchestrator" \
  || { echo "setup failed: the environment in .venv does not import" >&2; exit 1; }
echo "ready: $(.venv/bin/python -c 'import torch, ray, mlflow, optuna; print(f"torch {torch.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}, optuna {optuna.__version__}")') (requirements.lock)"
