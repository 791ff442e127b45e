#!/usr/bin/env bash
# The upgrade check: a throw-away venv with the NEWEST versions that pyproject's ranges allow (no
# lock), then the fast lane and the sweep end-to-end tests. Finds a breaking release (e.g. Optuna
# 5.1 breaking multi-objective sweeps) before a user who installs the package meets it.
#   bash scripts/upgrade-check.sh            # prints what differs from requirements.lock, then tests
# Exit code: pytest's. The venv is kept in $UPGRADE_VENV (default /tmp/orchestrate-upgrade-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${UPGRADE_VENV:-/tmp/orchestrate-upgrade-venv}"
PY="${PYTHON:-python3}"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q --disable-pip-version-check ${TORCH_SPEC:-torch==2.13.0}
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade --upgrade-strategy eager ".[test]"
echo "newer than requirements.lock:"
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -i -E "^(torch|nvidia-|triton|fewshot)" \
  | sort > "$VENV/freeze.txt"
grep -v '^#' requirements.lock | sort | comm -13 - "$VENV/freeze.txt" | sed 's/^/  /' || true
HOME_DIR="$(mktemp -d)"
trap 'rm -rf "$HOME_DIR"' EXIT
HOME="$HOME_DIR" XDG_CACHE_HOME="$HOME_DIR/.cache" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  -m "not slow" tests "${@}" && \
  HOME="$HOME_DIR" XDG_CACHE_HOME="$HOME_DIR/.cache" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_sweep_e2e.py tests/test_samplers.py
