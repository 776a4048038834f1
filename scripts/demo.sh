#!/usr/bin/env bash
# The main job on the offline embedded default: install, put the small Llama that has learned the Python standard
# library's source (shipped in pruning/assets/demo-model) in .cache/, then `pruning fit --config configs/demo.yaml`:
# SDM scoring on frozen weights, 30 % of MLP neurons pruned, a short recovery, and a table of held-out perplexity
# and parameter counts (dense / pruned / recovered, with a magnitude baseline at the same sparsity).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/pruning demo-model
exec .venv/bin/pruning fit --config configs/demo.yaml "$@"
