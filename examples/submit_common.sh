# Shared body of examples/qwen2.5-*/submit.sh. Sourced, not executed; each submit.sh sets NODES
# (its example's default) and calls dapo_submit.
#
# dapo_submit EXAMPLE [SBATCH_OPTION ...] -- [KEY=VALUE ...]
#   From the repository root, creates logs/ (Slurm does not create the output directory) and replaces
#   the shell with
#     sbatch --nodes=$NODES --job-name=dapo-EXAMPLE SBATCH_OPTION... $SBATCH_EXTRA \
#       slurm/dapo.sbatch examples/EXAMPLE/dapo.yaml KEY=VALUE...
#   SBATCH_EXTRA is split on white space (e.g. "--account=abc --time=48:00:00", or "--test-only" to
#   check the request against the cluster without submitting).
# Environment: NODES (required), SBATCH_EXTRA (optional); the job's own settings
# (DAPO_CONTAINER_IMAGE, NCCL_SOCKET_IFNAME, ...) are read by slurm/common.sh.

dapo_submit() {
  local example=$1
  shift
  local opts=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    opts+=("$1")
    shift
  done
  if [ $# -eq 0 ]; then
    echo "dapo_submit $example: put '--' between the sbatch options and the overrides" >&2
    return 2
  fi
  shift
  local root
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  cd "$root"
  mkdir -p logs
  local extra=()
  if [ -n "${SBATCH_EXTRA:-}" ]; then read -r -a extra <<< "$SBATCH_EXTRA"; fi
  exec sbatch --nodes="$NODES" --job-name="dapo-$example" "${opts[@]}" "${extra[@]}" \
    slurm/dapo.sbatch "examples/$example/dapo.yaml" "$@"
}
