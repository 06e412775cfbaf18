"""Rank 0 does it, every rank gets the result or the same typed error: the one helper for that pattern.

The trainer and the weight sync run in lockstep on every trainer rank, but engine calls (HTTP) happen on
global rank 0 only. :func:`on_rank0` runs a function there and hands its outcome to every rank with one
``torch.distributed.broadcast_object_list`` (a collective: every rank must call it at the same point):
either the return value, or the exception it raised, re-raised on every rank with the same type and
message. Without ``torch.distributed`` (or with one process) it simply calls the function.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Callable, Optional, TypeVar

import torch.distributed as dist

T = TypeVar("T")

_collective_timeout = timedelta(minutes=30)


def set_collective_timeout(timeout_s: float) -> timedelta:
    """Record the trainer's collective timeout (seconds; ``trainer.collective_timeout_min`` x 60, set by
    :func:`megatron_dapo.actor.parallel.init_parallel`) and return it. Raises ValueError unless > 0."""
    global _collective_timeout
    if not timeout_s > 0:
        raise ValueError(f"collective timeout must be > 0 seconds, got {timeout_s}")
    _collective_timeout = timedelta(seconds=timeout_s)
    return _collective_timeout


def collective_timeout() -> timedelta:
    """The collective timeout of the trainer's process groups (30 minutes until :func:`set_collective_timeout`).

    Pass it to every ``dist.new_group``: torch gives a new group its backend's default timeout (30 minutes
    for gloo), not the default group's."""
    return _collective_timeout


def distributed_on() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rebuild(exc_type: type, message: str) -> BaseException:
    """``exc_type(message)``, or a :class:`RuntimeError` naming the type when that constructor refuses."""
    try:
        return exc_type(message)
    except Exception:  # noqa: BLE001 - an exception class with a different constructor signature
        return RuntimeError(f"{exc_type.__name__}: {message}")


def on_rank0(fn: Callable[[], T], *, is_rank0: Optional[bool] = None, what: str = "",
             error: Optional[type[Exception]] = None) -> T:
    """Run ``fn()`` on global rank 0 and give every rank its result (collective).

    Args:
        fn: called on rank 0 only; its return value must be picklable.
        is_rank0: whether this process is rank 0; default ``dist.get_rank() == 0`` (``True`` without a
            process group). Pass it where the caller knows its rank another way (e.g. ``actor.rank``).
        what: what ``fn`` does, prefixed to the error message when ``error`` is given.
        error: wrap a failure as ``error(f"{what}: {type}: {message}")`` on every rank (rank 0 chains the
            original); ``None`` re-raises the original type with the original message.

    Returns:
        ``fn()``'s value, on every rank.

    Raises:
        The exception ``fn`` raised on rank 0 (or ``error``), on every rank with the same type and message;
        a type whose constructor does not take one message arrives as :class:`RuntimeError`
        ``"<Type>: <message>"`` off rank 0.
    """
    on = distributed_on()
    if is_rank0 is None:
        is_rank0 = (dist.get_rank() == 0) if on else True
    outcome: Optional[tuple] = None
    original: Optional[BaseException] = None
    if is_rank0:
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - every failure is handed to the other ranks
            original = exc
            if error is not None:
                outcome = ("error", error, f"{what}: {type(exc).__name__}: {exc}" if what else
                           f"{type(exc).__name__}: {exc}")
            else:
                outcome = ("error", type(exc), str(exc))
    if on:
        box = [outcome]
        try:
            dist.broadcast_object_list(box, src=0)
        except Exception:  # an exception class that does not pickle: send its name instead
            if outcome is None or outcome[0] == "ok":
                raise
            box = [("error", RuntimeError, f"{outcome[1].__name__}: {outcome[2]}")]
            dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if outcome is None:
        raise RuntimeError("on_rank0 called off rank 0 without a process group: no rank 0 to receive from")
    if outcome[0] == "ok":
        return outcome[1]
    if original is not None:
        if error is None:
            raise original
        raise _rebuild(outcome[1], outcome[2]) from original
    raise _rebuild(outcome[1], outcome[2])


def from_rank0(value: T, *, is_rank0: Optional[bool] = None) -> T:
    """Rank 0's ``value`` on every rank (collective; the value given elsewhere is ignored)."""
    return on_rank0(lambda: value, is_rank0=is_rank0)
