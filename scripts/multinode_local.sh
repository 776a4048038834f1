#!/usr/bin/env bash
# Two "nodes" × one process each on localhost under torchrun: exactly what a 2-node cluster job runs, minus the
# network. Usage: bash scripts/multinode_local.sh [CONFIG] [extra pruning-fit arguments...]
# On a real cluster run the same torchrun line on every node with --node-rank and --master-addr of node 0 (or
# use SLURM's srun, see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/demo.yaml}
shift || true
PORT=${PORT:-$((29500 + RANDOM % 1000))}
# torchrun leaves OMP_NUM_THREADS unset with one process per node; two processes on one host would then each take
# every core. Share the host's cores between the two "nodes".
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
pids=()
for rank in 0 1; do
  .venv/bin/torchrun --nnodes 2 --nproc-per-node 1 --node-rank "$rank" --master-addr 127.0.0.1 \
    --master-port "$PORT" -m pruning fit --config "$CONFIG" \
    --trainer.num_nodes 2 --trainer.devices 1 --trainer.strategy ddp "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
