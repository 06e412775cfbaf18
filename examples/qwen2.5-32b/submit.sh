#!/bin/bash
# Submit DAPO on Qwen2.5-32B: 16 nodes x 8 GPUs (slurm/dapo.sbatch, colocated SGLang + Megatron).
# Usage (from anywhere):  bash examples/qwen2.5-32b/submit.sh [key=value ...]
#   e.g. bash examples/qwen2.5-32b/submit.sh trainer.total_steps=10 run_name=try1
# Environment:
#   NODES         number of nodes (default 16; the layout in dapo.yaml was planned for 16)
#   SBATCH_EXTRA  extra sbatch options, e.g. "--account=abc --partition=gpu --time=48:00:00"
#                 ("--test-only" checks the request against the cluster without submitting)
#   DAPO_CONTAINER_IMAGE / DAPO_CONTAINER_MOUNTS, NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...: see slurm/common.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
mkdir -p logs
NODES=${NODES:-16}
extra=()
if [ -n "${SBATCH_EXTRA:-}" ]; then read -r -a extra <<< "$SBATCH_EXTRA"; fi
exec sbatch --nodes="$NODES" --job-name=dapo-qwen2.5-32b "${extra[@]}" \
  slurm/dapo.sbatch examples/qwen2.5-32b/dapo.yaml "$@"
