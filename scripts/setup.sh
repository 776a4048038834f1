#!/usr/bin/env bash
# Create ./.venv and install the project into it: torch's CPU build first (2.13.0 is provided locally), then the
# package with all extras. Re-running is cheap: nothing is reinstalled while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q -e ".[all]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import torch, transformers, pruning" && touch "$stamp"
fi
