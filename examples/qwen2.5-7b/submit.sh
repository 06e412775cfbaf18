#!/bin/bash
# Submit DAPO on Qwen2.5-7B: one node x 8 GPUs (slurm/dapo.sbatch, colocated SGLang + Megatron).
# Usage (from anywhere):  bash examples/qwen2.5-7b/submit.sh [key=value ...]
#   e.g. bash examples/qwen2.5-7b/submit.sh trainer.total_steps=10 run_name=try1
# NODES defaults to 1 (the layout in dapo.yaml was planned for 1); SBATCH_EXTRA and the
# other environment settings are described in examples/submit_common.sh, whose dapo_submit
# builds the sbatch command line.
set -euo pipefail
NODES=${NODES:-1}
source "$(dirname "$0")/../submit_common.sh"
dapo_submit qwen2.5-7b -- "$@"
