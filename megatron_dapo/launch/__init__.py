"""Launch helpers: distributed environment discovery (torchrun / Slurm / single process), the
parallelism planner, and the optional nemo-run launcher.

``REQUEUE_EXIT_CODE`` is the trainer's exit status after a preemption signal (SIGUSR1/SIGTERM): it has
checkpointed and wants the job requeued. ``slurm/*.sbatch`` run ``scontrol requeue $SLURM_JOB_ID`` when
the trainer step exits with it.
"""

REQUEUE_EXIT_CODE = 3
"""Exit status meaning "checkpoint written after a preemption signal; requeue me"."""

__all__ = ["REQUEUE_EXIT_CODE"]
