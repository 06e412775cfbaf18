#!/bin/bash
# Submit DAPO on Qwen2.5-0.5B: one GPU (slurm/dapo.sbatch, colocated SGLang + Megatron). The job
# asks for 1 GPU and does not take the whole node (--oversubscribe undoes the script's --exclusive).
# Usage (from anywhere):  bash examples/qwen2.5-0.5b/submit.sh [key=value ...]
#   e.g. bash examples/qwen2.5-0.5b/submit.sh trainer.total_steps=10 run_name=try1
# Environment:
#   NODES         number of nodes (default 1; the layout in dapo.yaml was planned for 1)
#   SBATCH_EXTRA  extra sbatch options, e.g. "--account=abc --partition=gpu --time=48:00:00"
#                 ("--test-only" checks the request against the cluster without submitting)
#   DAPO_CONTAINER_IMAGE / DAPO_CONTAINER_MOUNTS, NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...: see slurm/common.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
mkdir -p logs
NODES=${NODES:-1}
extra=()
if [ -n "${SBATCH_EXTRA:-}" ]; then read -r -a extra <<< "$SBATCH_EXTRA"; fi
exec sbatch --nodes="$NODES" --job-name=dapo-qwen2.5-0.5b \
  --gpus-per-node=1 --ntasks-per-node=1 --oversubscribe --mem=64G --cpus-per-task=8 "${extra[@]}" \
  slurm/dapo.sbatch examples/qwen2.5-0.5b/dapo.yaml "$@"
