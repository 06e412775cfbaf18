#!/bin/bash
# Runs as one srun task per node (see dapo_start_engines in slurm/common.sh): starts
# DAPO_ENGINES_PER_NODE rollout engines on this node, one port apart from DAPO_ENGINE_PORT, and
# waits. SIGTERM stops them all; if any engine dies the others are stopped and the task fails.
#
# Inputs (environment): DAPO_ENGINE_KIND (sglang|sglang-cpu|cpu), DAPO_ENGINES_PER_NODE, DAPO_ENGINE_TP,
# DAPO_ENGINE_PORT, DAPO_MEM_FRACTION, DAPO_MODEL_PATH, DAPO_MEMORY_SAVER (1: --enable-memory-saver,
# for engines colocated with the trainer), DAPO_ENGINE_LOG_DIR, DAPO_PY, DAPO_ENGINE_EXTRA_ARGS.
# Engine logs are appended to, so a requeued job (same job id) adds to the files of its first run.
set -u
node=${SLURMD_NODENAME:-$(hostname)}
kind=${DAPO_ENGINE_KIND:?} per_node=${DAPO_ENGINES_PER_NODE:?} tp=${DAPO_ENGINE_TP:-1}
base=${DAPO_ENGINE_PORT:?} model=${DAPO_MODEL_PATH:?} py=${DAPO_PY:-python3}
logdir=${DAPO_ENGINE_LOG_DIR:-logs}
mkdir -p "$logdir"

# GPUs visible to this task, e.g. "0,1,2,3,4,5,6,7"; engine i gets the i-th group of TP of them.
IFS=, read -r -a gpus <<< "${CUDA_VISIBLE_DEVICES:-}"
if [ "$kind" = sglang ] && [ "${#gpus[@]}" -lt $((per_node * tp)) ]; then
  echo "engines_on_node[$node]: need $((per_node * tp)) GPUs, CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES:-}'" >&2
  exit 1
fi

pids=()
stop_all() { [ "${#pids[@]}" -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null; wait; }
trap 'stop_all; exit 0' TERM INT

extra=()
if [ -n "${DAPO_ENGINE_EXTRA_ARGS:-}" ]; then read -r -a extra <<< "$DAPO_ENGINE_EXTRA_ARGS"; fi
for ((i = 0; i < per_node; i++)); do
  port=$((base + i))
  log=$logdir/$kind-$node-$port.log
  if [ "$kind" = sglang ]; then
    devices=$(IFS=,; echo "${gpus[*]:$((i * tp)):$tp}")
    saver=(); [ "${DAPO_MEMORY_SAVER:-0}" = 1 ] && saver=(--enable-memory-saver)
    echo "engines_on_node[$node]: sglang port $port GPUs $devices -> $log"
    CUDA_VISIBLE_DEVICES=$devices "$py" -m sglang.launch_server --model-path "$model" --tp-size "$tp" \
      --mem-fraction-static "${DAPO_MEM_FRACTION:-0.6}" "${saver[@]}" --host 0.0.0.0 --port "$port" \
      "${extra[@]}" >> "$log" 2>&1 &
  elif [ "$kind" = sglang-cpu ]; then  # real SGLang on a CPU node (.venv-sglang, CPU flags; ~2 min start-up)
    echo "engines_on_node[$node]: sglang (CPU) port $port -> $log"
    "$py" -m megatron_dapo.engines.launch serve-sglang "$model" --device cpu --host 0.0.0.0 --port "$port" \
      -- "${extra[@]}" >> "$log" 2>&1 &
  elif [ "$kind" = cpu ]; then
    echo "engines_on_node[$node]: cpu engine port $port -> $log"
    "$py" -m megatron_dapo.engines.cpu.server --model-path "$model" --host 0.0.0.0 --port "$port" >> "$log" 2>&1 &
  else
    echo "engines_on_node[$node]: unknown engine kind '$kind' (sglang, sglang-cpu or cpu)" >&2
    exit 1
  fi
  pids+=($!)
done

wait -n "${pids[@]}"
rc=$?
echo "engines_on_node[$node]: an engine exited with $rc; stopping the others" >&2
stop_all
exit "$rc"
