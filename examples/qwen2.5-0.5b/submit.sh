#!/bin/bash
# Submit DAPO on Qwen2.5-0.5B: one GPU (slurm/dapo.sbatch, colocated SGLang + Megatron). The job
# asks for 1 GPU and does not take the whole node (--oversubscribe undoes the script's --exclusive).
# Usage (from anywhere):  bash examples/qwen2.5-0.5b/submit.sh [key=value ...]
#   e.g. bash examples/qwen2.5-0.5b/submit.sh trainer.total_steps=10 run_name=try1
# NODES defaults to 1 (the layout in dapo.yaml was planned for 1); SBATCH_EXTRA and the
# other environment settings are described in examples/submit_common.sh, whose dapo_submit
# builds the sbatch command line.
set -euo pipefail
NODES=${NODES:-1}
source "$(dirname "$0")/../submit_common.sh"
dapo_submit qwen2.5-0.5b \
  --gpus-per-node=1 --ntasks-per-node=1 --oversubscribe --mem=64G --cpus-per-task=8 -- "$@"
