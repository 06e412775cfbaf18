# Shared shell functions for slurm/*.sbatch. Sourced, not executed.
#
# Environment knobs (all optional):
#   DAPO_ROOT              repository root (default: $SLURM_SUBMIT_DIR, i.e. submit from the repo root)
#   DAPO_CONFIG            config path when none is given as the first script argument
#   DAPO_OVERRIDES         extra key=value overrides, space-separated (script arguments come after and win)
#   DAPO_PYTHON            interpreter (default: $DAPO_ROOT/.venv/bin/python if present, else python3;
#                          inside a container: python)
#   DAPO_CONTAINER_IMAGE   pyxis image; every srun step then runs in it (--container-image)
#   DAPO_CONTAINER_MOUNTS  pyxis mounts (default: $DAPO_ROOT:$DAPO_ROOT); add data/model dirs here
#   DAPO_GPUS_PER_NODE     GPUs per node (default: $SLURM_GPUS_ON_NODE, else 8)
#   DAPO_ENGINE_BASE_PORT  first engine port on each node (default: 30000 + 16 x (job id mod 170))
#   DAPO_ENGINE_TIMEOUT    seconds to wait for engines' /health (default 1800)
#   DAPO_ENGINE_EXTRA_ARGS extra arguments for sglang.launch_server
#   DAPO_MAX_REQUEUES      stop requeueing after this many restarts (default 50)
#   DAPO_MAX_CRASH_RESTARTS  requeue after a trainer crash (any exit but 0, 2 and 3) at most this many times per
#                          job (default 3; 0: never). Counted in DAPO_LOG_DIR/<jobid>/crash_restarts, so a new
#                          submission starts from 0. The same step failing twice in a row stops the job anyway.
#   DAPO_LOG_DIR           where per-job logs go: DAPO_LOG_DIR/<jobid>/ (default: $DAPO_ROOT/logs); must be
#                          on a file system every node sees (the preemption request file lives there)
#   DAPO_TASK_EXIT_WAIT    seconds the trainer step waits for its other ranks once one rank has exited
#                          before Slurm terminates them (srun --wait; default 120)
#   SBATCH_EXTRA           `bash slurm/X.sbatch ...` outside a job (see dapo_submit_outside_slurm): more sbatch
#                          options, split on white space

dapo_log() { echo "[dapo $(date '+%F %T')] $*"; }

# dapo_submit_outside_slurm SCRIPT ARGS...: outside a Slurm job (`bash slurm/X.sbatch ARGS`, no SLURM_JOB_ID)
# create logs/ in the current directory and replace the shell with `sbatch $SBATCH_EXTRA SCRIPT ARGS`; inside
# a job, nothing. Slurm opens the #SBATCH --output file (logs/...) before the script runs, and when its
# directory is missing the job writes no output at all (the repository ships logs/ for plain `sbatch`).
# SBATCH_EXTRA: more sbatch options, split on white space (e.g. "--nodes=4 --time=2:00:00").
dapo_submit_outside_slurm() {
  [ -z "${SLURM_JOB_ID:-}" ] || return 0
  local script=$1 extra=()
  shift
  mkdir -p logs || dapo_die "cannot create $(pwd)/logs for the job's output"
  if [ -n "${SBATCH_EXTRA:-}" ]; then read -r -a extra <<< "$SBATCH_EXTRA"; fi
  exec sbatch "${extra[@]}" "$script" "$@"
}
dapo_die() { echo "[dapo $(date '+%F %T')] ERROR: $*" >&2; exit 1; }
# dapo_stop RC MESSAGE...: like dapo_die, with exit status RC (the trainer's, so that sacct shows it).
dapo_stop() { local rc=$1; shift; echo "[dapo $(date '+%F %T')] ERROR: $*" >&2; exit "$rc"; }

# dapo_init "$@": sets REPO, CONFIG, OVERRIDES (array), PY, CLI (array), LOG_DIR, CONTAINER_ARGS (array).
dapo_init() {
  REPO=$(cd "${DAPO_ROOT:-${SLURM_SUBMIT_DIR:-.}}" && pwd) || dapo_die "DAPO_ROOT/SLURM_SUBMIT_DIR is not a directory"
  cd "$REPO" || dapo_die "cannot cd to $REPO"
  [ -f "$REPO/slurm/common.sh" ] || dapo_die "$REPO is not the megatron_dapo repository (submit from its root or set DAPO_ROOT)"
  CONFIG=${DAPO_CONFIG:-}
  if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then CONFIG=$1; shift; fi
  [ -n "$CONFIG" ] || dapo_die "no config: pass it as the first argument (sbatch slurm/X.sbatch CONFIG [key=value ...]) or set DAPO_CONFIG"
  [ -f "$CONFIG" ] || dapo_die "config file not found: $CONFIG (relative paths are relative to $REPO)"
  OVERRIDES=()
  if [ -n "${DAPO_OVERRIDES:-}" ]; then read -r -a OVERRIDES <<< "$DAPO_OVERRIDES"; fi
  OVERRIDES+=("$@")
  CONTAINER_ARGS=()
  if [ -n "${DAPO_CONTAINER_IMAGE:-}" ]; then
    CONTAINER_ARGS=(--container-image="$DAPO_CONTAINER_IMAGE"
                    --container-mounts="${DAPO_CONTAINER_MOUNTS:-$REPO:$REPO}"
                    --container-workdir="$REPO" --no-container-mount-home)
    PY=${DAPO_PYTHON:-python}
  elif [ -n "${DAPO_PYTHON:-}" ]; then PY=$DAPO_PYTHON
  elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
  else PY=python3; fi
  # the CLI through the interpreter: the code under $REPO (PYTHONPATH below) is what runs, whichever
  # copy of the package that interpreter's console script would import
  CLI=("$PY" -m megatron_dapo.cli)
  LOG_DIR=${DAPO_LOG_DIR:-$REPO/logs}/${SLURM_JOB_ID:-local}
  mkdir -p "$LOG_DIR"
  # preemption requests for this run of the job (see _dapo_forward); must be visible on every node
  export DAPO_PREEMPT_FILE=$LOG_DIR/preempt-r${SLURM_RESTART_COUNT:-0}
  rm -f "$DAPO_PREEMPT_FILE"
  export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  dapo_log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}; config $CONFIG; overrides: ${OVERRIDES[*]:-none}"
  dapo_log "python $PY; logs in $LOG_DIR${DAPO_CONTAINER_IMAGE:+; container $DAPO_CONTAINER_IMAGE}"
  CRASH_FILE=$LOG_DIR/crash_restarts
  _dapo_log_crash_restart
}

# Crash restarts. After a trainer crash (exit status not 0, 2 or 3) dapo_finish appends one line
# "N RC STEP RESTART CHECKPOINT" to $CRASH_FILE (N: crash restart number, RC: the trainer's exit status, STEP:
# the last step in the run's steps.jsonl, RESTART: SLURM_RESTART_COUNT of the crashed run, CHECKPOINT: what the
# next run resumes from) and requeues the job.

# _dapo_log_crash_restart: in a run that follows a crash, say so (the trainer then logs "resumed from ...").
_dapo_log_crash_restart() {
  [ -s "$CRASH_FILE" ] || return 0
  local n rc step restart ckpt
  read -r n rc step restart ckpt < <(tail -n 1 "$CRASH_FILE")
  [ "$restart" = "$(( ${SLURM_RESTART_COUNT:-0} - 1 ))" ] || return 0
  dapo_log "restarted after a trainer crash (exit $rc after step $step;" \
    "crash restart $n/${DAPO_MAX_CRASH_RESTARTS:-3}); resuming from ${ckpt:-no checkpoint (step 0)}"
}

# _dapo_crash_restart RC: requeue after a crash, unless the budget is spent or it is a crash loop; exits.
_dapo_crash_restart() {
  local rc=$1 max=${DAPO_MAX_CRASH_RESTARTS:-3} info step ckpt resume n=0 prev_step=""
  if [ "$DAPO_NO_REQUEUE" = 1 ]; then
    dapo_log "trainer exited with $rc after a stop request; not requeueing"
    exit "$rc"
  fi
  info=$("$PY" -m megatron_dapo.launch.slurm_tools progress "$CONFIG" "${OVERRIDES[@]}") \
    || dapo_stop "$rc" "trainer crashed (exit $rc); cannot read the run's progress, not requeueing"
  { read -r step; read -r ckpt; read -r resume; } <<< "$info"
  if [ -s "$CRASH_FILE" ]; then
    n=$(wc -l < "$CRASH_FILE")
    prev_step=$(tail -n 1 "$CRASH_FILE" | cut -d' ' -f3)
  fi
  [ "$prev_step" != "$step" ] \
    || dapo_stop "$rc" "crash loop: the trainer failed twice in a row after step $step (exit $rc); not requeueing"
  [ "$n" -lt "$max" ] || dapo_stop "$rc" "trainer crashed (exit $rc after step $step) and the job already" \
    "restarted $n time(s) after crashes (DAPO_MAX_CRASH_RESTARTS=$max); not requeueing"
  [ "${SLURM_RESTART_COUNT:-0}" -lt "${DAPO_MAX_REQUEUES:-50}" ] || dapo_stop "$rc" "trainer crashed (exit $rc)" \
    "and the job already restarted ${SLURM_RESTART_COUNT} times (DAPO_MAX_REQUEUES); not requeueing"
  [ "$resume" = auto ] \
    || dapo_log "warning: resume=$resume: the restarted trainer does not continue from this run's newest checkpoint"
  echo "$((n + 1)) $rc $step ${SLURM_RESTART_COUNT:-0} $ckpt" >> "$CRASH_FILE"
  dapo_log "trainer crashed (exit $rc after step $step); crash restart $((n + 1))/$max: requeueing job $SLURM_JOB_ID;" \
    "it resumes from ${ckpt:-no checkpoint (step 0)}"
  scontrol requeue "$SLURM_JOB_ID" || dapo_die "scontrol requeue failed (was the job submitted with --requeue?)"
  exit 0
}

# Communication settings. Values already set by the user or the site are kept.
dapo_nccl_env() {
  # Megatron's TP/SP communication overlap needs kernels issued in order on one hardware queue.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # Surface NCCL failures as Python exceptions instead of hangs.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # Site-specific, left unset unless given: NCCL_SOCKET_IFNAME (bootstrap/TCP interface, e.g. ib0,
  # bond0, or ^lo,docker to exclude), NCCL_IB_HCA (InfiniBand HCAs, e.g. mlx5_0,mlx5_1,...),
  # NCCL_IB_GID_INDEX (RoCE: usually 3), NCCL_NET_GDR_LEVEL (GPUDirect RDMA), NCCL_IB_TIMEOUT
  # (raise to 22 on large jobs), GLOO_SOCKET_IFNAME (same interface as NCCL_SOCKET_IFNAME, for the
  # CPU process groups). They pass through to every srun step unchanged.
  local v
  for v in NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_GID_INDEX NCCL_NET_GDR_LEVEL NCCL_IB_TIMEOUT GLOO_SOCKET_IFNAME; do
    [ -n "${!v:-}" ] && dapo_log "$v=${!v}"
  done
  # Tokenizers' own thread pool fights with DataLoader workers.
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
  return 0
}

# dapo_cfg KEY: value of a config key after overrides (no validation).
dapo_cfg() {
  "$PY" -m megatron_dapo.launch.slurm_tools cfg-get "$CONFIG" "$1" "${OVERRIDES[@]}" \
    || dapo_die "cannot read config key $1 from $CONFIG"
}

# dapo_hosts HOSTLIST: one hostname per line.
dapo_hosts() {
  if command -v scontrol >/dev/null 2>&1; then scontrol show hostnames "$1"
  else "$PY" -m megatron_dapo.launch.dist_env hostnames "$1"; fi
}

# dapo_node_addr NODE: the address other nodes reach NODE at (Slurm's NodeAddr; the name itself if unknown).
dapo_node_addr() {
  local addr=""
  if command -v scontrol >/dev/null 2>&1; then
    addr=$(scontrol show node "$1" -o 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
  fi
  echo "${addr:-$1}"
}

# dapo_rendezvous NODE: export MASTER_ADDR (NODE's address) and MASTER_PORT (from the job id).
dapo_rendezvous() {
  export MASTER_ADDR=${MASTER_ADDR:-$(dapo_node_addr "$1")}
  export MASTER_PORT=${MASTER_PORT:-$("$PY" -m megatron_dapo.launch.dist_env master-port "${SLURM_JOB_ID:-0}")}
  dapo_log "rendezvous $MASTER_ADDR:$MASTER_PORT"
}

dapo_engine_base_port() {
  echo "${DAPO_ENGINE_BASE_PORT:-$((30000 + 16 * (${SLURM_JOB_ID:-0} % 170)))}"
}

# dapo_start_engines KIND FIRST_NODE_INDEX NUM_NODES ENGINES_PER_NODE ENGINE_TP MEM_FRACTION MODEL MEMORY_SAVER
# Starts one srun step (--overlap, one task per node) that runs slurm/engines_on_node.sh, which launches
# ENGINES_PER_NODE engines per node. Sets ENGINE_PID (the srun) and ENGINE_URLS (comma-joined).
dapo_start_engines() {
  local kind=$1 first=$2 nnodes=$3 per_node=$4 tp=$5 frac=$6 model=$7 saver=$8
  local base; base=$(dapo_engine_base_port)
  local hosts; mapfile -t hosts < <(dapo_hosts "$SLURM_JOB_NODELIST" | tail -n +"$((first + 1))" | head -n "$nnodes")
  [ "${#hosts[@]}" -eq "$nnodes" ] || dapo_die "need $nnodes engine nodes from index $first, job has $(dapo_hosts "$SLURM_JOB_NODELIST" | wc -l)"
  local urls=() h i
  for h in "${hosts[@]}"; do
    for ((i = 0; i < per_node; i++)); do urls+=("http://$(dapo_node_addr "$h"):$((base + i))"); done
  done
  ENGINE_URLS=$(IFS=,; echo "${urls[*]}")
  dapo_log "starting $((nnodes * per_node)) $kind engine(s) (TP=$tp, mem fraction $frac) on ${hosts[*]}: $ENGINE_URLS"
  local gpu_args=()
  [ "$kind" = sglang ] && gpu_args=(--gpus-per-node="$GPUS_PER_NODE")
  DAPO_ENGINE_KIND=$kind DAPO_ENGINES_PER_NODE=$per_node DAPO_ENGINE_TP=$tp DAPO_ENGINE_PORT=$base \
  DAPO_MEM_FRACTION=$frac DAPO_MODEL_PATH=$model DAPO_MEMORY_SAVER=$saver DAPO_ENGINE_LOG_DIR=$LOG_DIR/engines \
  DAPO_PY=$PY \
    srun --overlap --nodes="$nnodes" --ntasks="$nnodes" --relative="$first" --ntasks-per-node=1 "${gpu_args[@]}" \
      "${CONTAINER_ARGS[@]}" --output="$LOG_DIR/engines-step.log" \
      bash "$REPO/slurm/engines_on_node.sh" &
  ENGINE_PID=$!
}

# dapo_wait_engines: block until every engine answers /health (or fail the job).
dapo_wait_engines() {
  "$PY" -m megatron_dapo.launch.slurm_tools wait-health --timeout "${DAPO_ENGINE_TIMEOUT:-1800}" \
      --pid "$ENGINE_PID" "$ENGINE_URLS" \
    || { dapo_stop_engines; dapo_die "engines did not become healthy; see $LOG_DIR/engines/"; }
}

dapo_stop_engines() {
  if [ -n "${ENGINE_PID:-}" ] && kill -0 "$ENGINE_PID" 2>/dev/null; then
    dapo_log "stopping engines"
    kill -TERM "$ENGINE_PID" 2>/dev/null
    local _; for _ in $(seq 1 30); do kill -0 "$ENGINE_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL "$ENGINE_PID" 2>/dev/null
    wait "$ENGINE_PID" 2>/dev/null
  fi
  ENGINE_PID=""
}

# Signal handling. Slurm sends SIGUSR1 to this batch shell (#SBATCH --signal=B:USR1@SECONDS) before
# the time limit; we pass it on to the trainer, which checkpoints at the next step boundary and exits
# with 3, and then requeue. SIGUSR2 (scancel --batch --signal=USR2 JOB) does the same without
# requeueing: a clean stop. SIGTERM (plain scancel, or preemption that cancels) also stops without
# requeueing. The request reaches the trainer processes through a file, DAPO_PREEMPT_FILE, that
# slurm/trainer_task.sh (one per rank) polls: see there for why the step is not signalled directly.
TRAINER_PID=""
DAPO_NO_REQUEUE=0
_dapo_forward() {
  dapo_log "received $1; asking the trainer to checkpoint and exit"
  [ "$2" = stop ] && DAPO_NO_REQUEUE=1
  # kept until the trainer runs when it comes early (the trainer then stops after its first step)
  [ -n "${DAPO_PREEMPT_FILE:-}" ] && echo "$1" > "$DAPO_PREEMPT_FILE"
  return 0
}
trap '_dapo_forward SIGUSR1 requeue' USR1
trap '_dapo_forward SIGUSR2 stop' USR2
trap '_dapo_forward SIGTERM stop' TERM

# dapo_run_trainer SRUN_ARGS... -- PROGRAM ARGS...: runs the trainer step (every task through
# slurm/trainer_task.sh) in the background, so that traps fire while it runs; waits for it and sets
# TRAINER_RC.
# After a preemption request every rank writes its part of the checkpoint, meets the others at a
# barrier and exits with 3, but the ranks leave at slightly different times. With --kill-on-bad-exit=1
# the first exit 3 would make Slurm SIGTERM the ranks still tearing down, and the step would report
# 143, not 3; so the step runs with --kill-on-bad-exit=0 and --wait=DAPO_TASK_EXIT_WAIT: once one rank
# has exited the others get that long to follow (a crashed rank still ends the step, after the wait).
dapo_run_trainer() {
  local srun_args=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do srun_args+=("$1"); shift; done
  shift
  dapo_log "trainer: srun ${srun_args[*]} $*"
  srun --overlap --kill-on-bad-exit=0 --wait="${DAPO_TASK_EXIT_WAIT:-120}" "${srun_args[@]}" "${CONTAINER_ARGS[@]}" \
    bash "$REPO/slurm/trainer_task.sh" "$@" &
  TRAINER_PID=$!
  while :; do
    wait "$TRAINER_PID"; TRAINER_RC=$?
    # wait returns >128 when a trapped signal interrupted it while the step is still running.
    if [ "$TRAINER_RC" -gt 128 ] && kill -0 "$TRAINER_PID" 2>/dev/null; then continue; fi
    break
  done
  TRAINER_PID=""
  dapo_log "trainer exited with $TRAINER_RC"
}

# dapo_finish: stop engines; then by the trainer's exit status: 0 -> exit 0; 3 (it checkpointed after a
# preemption request) -> requeue; 2 (a config, data or model error: a restart cannot fix it) -> exit 2; anything
# else (a crash: killed rank, failed or timed-out collective, OOM) -> requeue, at most DAPO_MAX_CRASH_RESTARTS
# times, and not when the step it failed at is the one the previous crash failed at (_dapo_crash_restart).
dapo_finish() {
  local rc=${TRAINER_RC:-1} requeue_rc
  requeue_rc=$("$PY" -c 'from megatron_dapo.launch import REQUEUE_EXIT_CODE as c; print(c)' 2>/dev/null || echo 3)
  dapo_stop_engines
  if [ "$rc" -eq 0 ]; then exit 0; fi
  [ "$rc" -ne 2 ] || dapo_stop 2 "trainer stopped with exit 2 (config, data or model error; see above): not requeueing"
  if [ "$rc" -eq "$requeue_rc" ]; then
    if [ "$DAPO_NO_REQUEUE" = 1 ]; then
      dapo_log "trainer checkpointed; stopping without requeue (resume later with resume=auto)"
      exit 0
    fi
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "${DAPO_MAX_REQUEUES:-50}" ]; then
      dapo_die "trainer asked for a requeue but the job already restarted ${SLURM_RESTART_COUNT} times"
    fi
    dapo_log "trainer checkpointed after preemption; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || dapo_die "scontrol requeue failed (was the job submitted with --requeue?)"
    exit 0
  fi
  _dapo_crash_restart "$rc"
}
