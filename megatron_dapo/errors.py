"""The root of megatron_dapo's user-facing failures.

Every error that means "the run cannot go on, and the message says why and what to change" derives from
:class:`MegatronDapoError` (configuration, data, model, engine, weight sync, checkpoint, dynamic sampling,
missing optional backends). Each subclass keeps its former builtin base as a second base (``ValueError``
or ``RuntimeError``), so ``except ValueError`` callers keep working.

:func:`megatron_dapo.trainer.run_training` catches the root (and ``FileNotFoundError``) and ends the run
with one line on stderr and exit code :data:`EXIT_USER_ERROR`, without a traceback. Anything else is a bug
and propagates with its traceback.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2
"""Process exit code of a run stopped by a :class:`MegatronDapoError` (or a missing file)."""

EXIT_RESTARTABLE = 4
"""Process exit code of a run stopped by a :class:`RestartableFailure`: one line, no traceback, and a restart of
the job can fix it (the Slurm scripts requeue every exit other than 0 and 2, and the run resumes)."""


class MegatronDapoError(Exception):
    """A failure the user can act on; ``str(error)`` is the whole message (names the key, file, URL...)."""


def one_line(message: str) -> str:
    """``message`` folded onto one line: its non-blank lines stripped and joined with ``"; "`` (an engine's
    log tail or a multi-line reason stays readable in the single line a stopped run ends with)."""
    return "; ".join(part.strip() for part in message.splitlines() if part.strip())


class TrainingStopped(MegatronDapoError, RuntimeError):
    """The run cannot continue; the message says why and what to change (no traceback needed)."""


class RestartableFailure(MegatronDapoError):
    """The run cannot go on, but the cause is the cluster's, not the configuration's: restarting the job fixes it
    (e.g. an engine the run did not start died: the job script starts it again). Ends the run with exit code
    :data:`EXIT_RESTARTABLE` instead of :data:`EXIT_USER_ERROR`."""

