"""The worker threads that score rewards off the rollout client's asyncio event loop.

:func:`~megatron_dapo.reward.score_batch` is synchronous: the DAPO / GSM8K rules run in-process (about
10 us per response) and math-verify items wait on the worker processes of :mod:`.math_verify_pool` (up
to ``timeout_s`` per item). Called on the event loop it would stall every other coroutine, i.e. the
generation requests of all other groups. The rollout loop therefore awaits it through
``loop.run_in_executor(get_score_executor(), ...)`` (Python docs, "asyncio: Executing code in thread or
process pools"): while a group is scored in a thread, the loop keeps sending and receiving the other
groups' requests.

Threads, not processes: the in-process rules are too cheap to be worth a process hop, and math-verify
already runs in separate interpreters (whose pool is thread-safe: one lock per ``verify_many``), so a
thread only waits there, without holding the GIL.

Lifetime: the thread pool and the math-verify pool (:func:`~megatron_dapo.reward.math_verify_pool.get_pool`)
are created on first use. A run owns them through :func:`scoring_resources`, which its ``ExitStack`` enters
(the trainer, ``megatron-dapo eval``) and which stops both when the run ends; the ``atexit`` hooks remain
only for library callers that use the scorers without a run.
"""
from __future__ import annotations

import atexit
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

from .math_verify_pool import shutdown_pool

__all__ = ["DEFAULT_SCORE_THREADS", "get_score_executor", "scoring_resources", "shutdown_score_executor"]

#: Groups that can be scored at the same time.
DEFAULT_SCORE_THREADS = 4

_EXECUTOR: Optional[ThreadPoolExecutor] = None
_LOCK = threading.Lock()


def get_score_executor() -> ThreadPoolExecutor:
    """The process-wide scoring thread pool (:data:`DEFAULT_SCORE_THREADS` threads, named
    ``reward-score-*``), created on first use and again after :func:`shutdown_score_executor`."""
    global _EXECUTOR
    with _LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = ThreadPoolExecutor(max_workers=DEFAULT_SCORE_THREADS, thread_name_prefix="reward-score")
        return _EXECUTOR


def shutdown_score_executor(wait: bool = True) -> None:
    """Stop the scoring threads (idempotent; registered with ``atexit``). ``wait``: let the groups being
    scored finish first."""
    global _EXECUTOR
    with _LOCK:
        ex, _EXECUTOR = _EXECUTOR, None
    if ex is not None:
        ex.shutdown(wait=wait)


atexit.register(shutdown_score_executor)


@contextlib.contextmanager
def scoring_resources() -> Iterator[None]:
    """Give the scoring thread pool and the math-verify worker processes to the enclosing run: both are
    created lazily inside the ``with`` block and stopped when it exits, normally or by an exception
    (waiting for the groups being scored)."""
    try:
        yield
    finally:
        shutdown_score_executor()
        shutdown_pool()
