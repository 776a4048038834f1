#!/usr/bin/env bash
# The test command: install, lint, then the whole suite (tiny models, CPU, a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check pruning callbacks datamodules tests benchmarks
.venv/bin/ruff format --check pruning callbacks datamodules tests benchmarks
.venv/bin/mkdocs build --strict --quiet   # the docs/ tree (tests/test_docs.py also builds it)
exec .venv/bin/python -m pytest tests "$@"
