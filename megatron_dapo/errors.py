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


class MegatronDapoError(Exception):
    """A failure the user can act on; ``str(error)`` is the whole message (names the key, file, URL...)."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` as a single line: ``"<TypeName>: <message>"``, newlines folded to ``"; "``
    (engine log tails and multi-line reasons stay readable on one line)."""
    text = "; ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
