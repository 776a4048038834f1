#!/usr/bin/env bash
# The main job on the offline embedded default: install, then `pruning demo` (trains or reuses a small Llama on the
# Python standard library's source, prunes it with every criterion, prints held-out perplexity).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/pruning demo "$@"
