#!/bin/bash
# Submit DAPO on Qwen3-30B-A3B (MoE): 8 nodes x 8 GPUs (slurm/dapo.sbatch, colocated SGLang + Megatron).
# Usage (from anywhere):  bash examples/qwen3-30b-a3b/submit.sh [key=value ...]
#   e.g. bash examples/qwen3-30b-a3b/submit.sh trainer.total_steps=10 run_name=try1
# NODES defaults to 8 (the layout in dapo.yaml, EP=8 per node, was planned for 8); SBATCH_EXTRA and the
# other environment settings are described in examples/submit_common.sh, whose dapo_submit
# builds the sbatch command line.
set -euo pipefail
NODES=${NODES:-8}
source "$(dirname "$0")/../submit_common.sh"
dapo_submit qwen3-30b-a3b -- "$@"
