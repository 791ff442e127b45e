#!/usr/bin/env bash
# Rewrites requirements.lock from .venv (after an upgrade that the tests passed with).
set -euo pipefail
cd "$(dirname "$0")/.."
{ sed -n '1,/^# Regenerate/p' requirements.lock
  .venv/bin/python -m pip freeze --exclude-editable | grep -v -i -E "^(torch|nvidia-|triton|fewshot)"
} > requirements.lock.new
mv requirements.lock.new requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) packages"
