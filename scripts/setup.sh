#!/usr/bin/env bash
# Create ./.venv and install the project into it: torch's CPU build first (2.13.0 is provided locally), then the
# package with all extras. Re-running is cheap: nothing is reinstalled while pyproject.toml is unchanged. pip's own
# output goes to .venv/install.log (shown when an install fails).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "installing into .venv (torch 2.13.0 CPU first, then this package; a minute or two)..."
  log=.venv/install.log
  : > "$log"
  for what in "--upgrade pip" "torch==2.13.0" "-e .[all]"; do
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install -q $what >> "$log" 2>&1 || { cat "$log"; exit 1; }
  done
  .venv/bin/python -c "import torch, transformers, pruning" && touch "$stamp"
fi
