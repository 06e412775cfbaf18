#!/bin/bash
# One trainer rank: `srun ... bash slurm/trainer_task.sh PROGRAM ARGS...` (see dapo_run_trainer in
# slurm/common.sh). Runs PROGRAM ARGS, ends the processes it left behind (end_leftovers) and exits with its status.
#
# Why not let srun forward the preemption signal: Slurm delivers a step signal to *every* process of
# the step, including helpers the trainer has started (the process that megatron's distributed
# checkpoint writer spawns, data loader workers), and those die of an unhandled SIGUSR1, which breaks
# the very checkpoint the signal asks for. So the batch script creates the file DAPO_PREEMPT_FILE (on a
# file system every node sees) and this wrapper sends SIGUSR1 to the trainer process alone; the trainer
# then checkpoints at the next step boundary and exits with 3. The signal is held back until the
# trainer has installed its SIGUSR1 handler (bit 10 of SigCgt in /proc/PID/status): before that,
# SIGUSR1 would kill it.
#
# Inputs (environment): DAPO_PREEMPT_FILE (required), DAPO_PREEMPT_POLL_S (poll period, default 0.5).
set -u
flag=${DAPO_PREEMPT_FILE:?DAPO_PREEMPT_FILE is not set (start this through dapo_run_trainer)}
poll=${DAPO_PREEMPT_POLL_S:-0.5}
[ $# -gt 0 ] || { echo "trainer_task: no program given" >&2; exit 2; }

# 0 when process $1 catches SIGUSR1 (signal 10: bit 9 of the SigCgt mask), or when /proc cannot say.
catches_usr1() {
  local mask
  mask=$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null)
  [ -n "$mask" ] || return 0
  (( (16#$mask >> 9) & 1 ))
}

# Every process the trainer starts inherits this mark (see end_leftovers).
export DAPO_TASK_MARK="${SLURM_JOB_ID:-0}.${SLURM_STEP_ID:-0}.${SLURM_PROCID:-0}.$$"

# end_leftovers: SIGKILL the processes the trainer left behind. When a rank is killed (kill -9, the OOM
# killer), its helpers (multiprocessing's resource tracker and spawned workers) live on, reparented to init,
# with this task's stdout/stderr open: the step then does not end until srun --wait kills the tasks, and the
# helpers survive even that. They carry DAPO_TASK_MARK in their environment, which is how they are found.
end_leftovers() {
  local env pid
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/}; pid=${pid%/environ}
    [ "$pid" = "$$" ] && continue
    grep -qzx "DAPO_TASK_MARK=$DAPO_TASK_MARK" "$env" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  done
  return 0
}

"$@" &
child=$!
# A signal Slurm sends to the whole step (plain scancel: SIGTERM; scancel --full --signal=USR1) reaches
# the trainer directly; the wrapper only has to survive it and keep waiting.
trap ':' TERM USR1 USR2 INT
sent=0
while kill -0 "$child" 2>/dev/null; do
  if [ "$sent" = 0 ] && [ -e "$flag" ] && catches_usr1 "$child"; then
    kill -USR1 "$child" 2>/dev/null && sent=1
  fi
  sleep "$poll"
done
wait "$child"
rc=$?
end_leftovers
exit "$rc"
