"""A persistent pool of worker processes running ``math-verify`` with hard per-item time limits.

``math_verify.parse``/``verify`` (https://github.com/huggingface/Math-Verify) turn model-written
LaTeX into SymPy objects; SymPy simplification can take unbounded time and memory, and the library's
own timeout relies on ``signal.alarm`` (main thread only). So model text is never parsed in the
trainer process: each item is sent to a worker process, and a worker that has not answered within
``timeout_s`` is killed (SIGKILL) and replaced. The item scores as a timeout.

Workers are separate Python interpreters started lazily with :class:`subprocess.Popen`
(``python -c`` running :func:`_worker_entry` of this module), never ``fork``: the trainer may hold
CUDA contexts, NCCL communicators and threads that must not be duplicated. Unlike
``multiprocessing``'s ``spawn``/``forkserver``, a worker never re-imports the caller's ``__main__``
module, so scoring works from any script (guarded by ``if __name__ == "__main__":`` or not), a
notebook or a Ray worker. Parent and worker talk over a socket pair wrapped in
:class:`multiprocessing.connection.Connection`. Only :class:`math_verify.LatexExtractionConfig`
is used, whose parser is an ANTLR grammar: it never ``eval``s text (the ``ExprExtractionConfig``
path calls SymPy's ``parse_expr``, which does, and is therefore not used).

A worker that cannot start (math-verify missing, a broken interpreter) is an error:
:meth:`MathVerifyPool.verify_many` raises :class:`MathVerifyWorkerError` after 3 consecutive
start-up failures instead of scoring items as parse errors.
"""
from __future__ import annotations

import atexit
import logging
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Sequence

from ..errors import MegatronDapoError

__all__ = ["MathVerifyPool", "MathVerifyWorkerError", "get_pool", "shutdown_pool", "verify_in_worker"]

logger = logging.getLogger(__name__)

#: Status strings returned per item (a subset of RewardResult.status).
OK, PARSE_ERROR, TIMEOUT = "ok", "parse_error", "timeout"


# --------------------------------------------------------------------------------------------
# Worker side (runs in the child process)
# --------------------------------------------------------------------------------------------
_GOLD_CACHE: dict[str, object] = {}
_GOLD_CACHE_MAX = 4096


def verify_in_worker(gold: str, pred: str, strict: bool) -> tuple[str, bool]:
    """Parse ``gold`` and ``pred`` with math-verify's LaTeX extractor and compare them.

    Meant to run inside a worker process (it has no time limit of its own). ``gold`` and ``pred``
    must be delimited LaTeX (``$...$`` or containing ``\\boxed{}``). ``strict`` is passed to
    ``math_verify.verify`` (strict=True: variable names matter, sets are not tuples).

    Returns:
        (status, acc): ``("ok", bool)``, or ``("parse_error", False)`` when either side yields no
        expression.
    """
    # heavy: math-verify loads SymPy; only the worker processes parse
    from math_verify import LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig()]
    g = _GOLD_CACHE.get(gold)
    if g is None:
        g = parse(gold, extraction_config=cfg, parsing_timeout=None)
        if len(_GOLD_CACHE) >= _GOLD_CACHE_MAX:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[gold] = g
    if not g:
        return PARSE_ERROR, False
    p = parse(pred, extraction_config=cfg, parsing_timeout=None)
    if not p:
        return PARSE_ERROR, False
    return OK, bool(verify(g, p, strict=strict, timeout_seconds=None))


#: Address-space limit of a worker (bytes): a runaway SymPy computation fails with MemoryError
#: instead of exhausting the node. Override with env MEGATRON_DAPO_REWARD_WORKER_MEM_GB (0 = none).
WORKER_MEMORY_LIMIT_GB = 4.0


def _limit_memory() -> None:
    try:
        gb = float(os.environ.get("MEGATRON_DAPO_REWARD_WORKER_MEM_GB", WORKER_MEMORY_LIMIT_GB))
        if gb > 0:
            lim = int(gb * (1 << 30))
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                lim = min(lim, hard)
            resource.setrlimit(resource.RLIMIT_AS, (lim, hard))
    except (ImportError, ValueError, OSError):
        pass


def _worker_main(conn) -> None:  # pragma: no cover - runs in a child process
    """Worker loop: receive ``(gold, pred, strict)``, send ``(status, acc)``; ``None`` stops."""
    _limit_memory()
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    try:
        # heavy: math-verify loads SymPy; only the worker processes parse
        import math_verify.utils as mv_utils  # silence the "timeout disabled" warning
        mv_utils.TIMEOUT_WARNING_SHOWN = True
        # heavy: math-verify loads SymPy; only the worker processes parse
        import math_verify.parser as mv_parser
        import math_verify.grader as mv_grader
        mv_parser.TIMEOUT_WARNING_SHOWN = True
        mv_grader.TIMEOUT_WARNING_SHOWN = True
        verify_in_worker("$1$", "$1$", True)  # warm the parser (ANTLR tables, SymPy imports)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        conn.send(("startup_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        gold, pred, strict = msg
        try:
            out = verify_in_worker(gold, pred, strict)
        except (Exception, MemoryError, RecursionError):  # noqa: BLE001 - per-item failure
            out = (PARSE_ERROR, False)
        try:
            conn.send(out)
        except (EOFError, OSError):
            return


def _worker_entry(fd: int) -> None:  # pragma: no cover - runs in a child process
    """Entry point of a worker interpreter: serve :func:`_worker_main` on the inherited socket ``fd``."""
    conn = Connection(fd)
    try:
        _worker_main(conn)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------
class MathVerifyWorkerError(MegatronDapoError, RuntimeError):
    """math-verify workers cannot be started; scoring stops instead of returning wrong rewards."""


#: Directory holding the ``megatron_dapo`` package, put first on a worker's ``PYTHONPATH``.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_WORKER_CODE = ("import sys; from megatron_dapo.reward.math_verify_pool import _worker_entry; "
                "_worker_entry(int(sys.argv[1]))")


class _WorkerProcess:
    """The handful of ``multiprocessing.Process`` methods the pool uses, over a ``Popen``."""

    def __init__(self, popen: subprocess.Popen):
        self._popen = popen

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def kill(self) -> None:
        if self._popen.poll() is None:
            self._popen.kill()

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass


def _launch_worker() -> tuple[_WorkerProcess, Connection]:
    """Start one worker interpreter; returns (process, parent end of its connection).

    The worker runs ``python -c`` with this module's :func:`_worker_entry`; the caller's
    ``__main__`` is never imported in it.
    """
    parent_sock, child_sock = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    fd = child_sock.fileno()
    try:
        popen = subprocess.Popen([sys.executable or "python3", "-c", _WORKER_CODE, str(fd)],
                                 pass_fds=(fd,), env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, close_fds=True)
    except BaseException:
        parent_sock.close()
        child_sock.close()
        raise
    child_sock.close()
    return _WorkerProcess(popen), Connection(parent_sock.detach())


@dataclass
class _Worker:
    proc: _WorkerProcess
    conn: object
    state: str = "starting"  # starting | idle | busy
    deadline: float = 0.0
    job: int = -1
    tasks: int = 0


@dataclass
class PoolStats:
    """Lifetime counters of a :class:`MathVerifyPool`."""

    items: int = 0
    timeouts: int = 0
    crashes: int = 0
    workers_started: int = 0
    startup_failures: int = 0
    last_startup_error: str = ""


class MathVerifyPool:
    """Persistent worker processes for math-verify with a hard per-item time limit.

    Args:
        num_workers: number of worker processes (>= 1); items are processed in parallel.
        startup_timeout_s: seconds a new worker may take to import math-verify and report ready.
        max_tasks_per_worker: a worker is recycled after this many items (bounds SymPy cache
            growth).

    Raises:
        ValueError: ``num_workers < 1``.
    """

    def __init__(self, num_workers: int = 1, *, startup_timeout_s: float = 120.0,
                 max_tasks_per_worker: int = 5000):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = int(num_workers)
        self.startup_timeout_s = float(startup_timeout_s)
        self.max_tasks_per_worker = int(max_tasks_per_worker)
        self.stats = PoolStats()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        try:
            proc, parent_conn = _launch_worker()
        except OSError as e:
            raise MathVerifyWorkerError(f"cannot start a math-verify worker: {e}") from e
        w = _Worker(proc=proc, conn=parent_conn, deadline=time.monotonic() + self.startup_timeout_s)
        self._workers.append(w)
        self.stats.workers_started += 1
        return w

    def _kill(self, w: _Worker) -> None:
        try:
            w.proc.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
        w.proc.join(timeout=5.0)
        try:
            w.conn.close()
        except Exception:  # noqa: BLE001
            pass
        if w in self._workers:
            self._workers.remove(w)

    def _retire(self, w: _Worker) -> None:
        try:
            w.conn.send(None)
        except Exception:  # noqa: BLE001
            pass
        w.proc.join(timeout=2.0)
        if w.proc.is_alive():
            self._kill(w)
            return
        w.conn.close()
        self._workers.remove(w)

    def worker_pids(self) -> list[int]:
        """PIDs of the live worker processes (for tests and monitoring)."""
        return [w.proc.pid for w in self._workers if w.proc.pid is not None]

    def warmup(self) -> None:
        """Start all workers now and wait until they are ready (otherwise done on first use).

        Raises:
            MathVerifyWorkerError: a worker failed to start (e.g. math-verify is not installed).
        """
        with self._lock:
            self._ensure_workers(self.num_workers)
            while any(w.state == "starting" for w in self._workers):
                self._poll(deque(), [], [])
                if not self._workers:
                    raise MathVerifyWorkerError("math-verify worker failed to start: "
                                       + self.stats.last_startup_error)

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        with self._lock:
            for w in list(self._workers):
                if w.state == "busy":
                    self._kill(w)
                else:
                    self._retire(w)
            self._closed = True

    def _ensure_workers(self, want: int) -> None:
        self._closed = False
        while len(self._workers) < min(want, self.num_workers):
            self._start_worker()

    # -- scheduling --------------------------------------------------------------------------
    def _poll(self, pending: deque, items, results) -> None:
        """Hand out jobs, wait for one event (result, readiness or deadline), handle it."""
        for w in self._workers:
            if w.state == "idle" and pending:
                j = pending.popleft()
                try:
                    w.conn.send(items[j])
                except (OSError, EOFError, ValueError):
                    pending.appendleft(j)
                    self.stats.crashes += 1
                    self._kill(w)
                    return
                w.state, w.job = "busy", j
                w.deadline = time.monotonic() + self._timeout_s
        waiting = [w for w in self._workers if w.state in ("starting", "busy")]
        if not waiting:
            return
        now = time.monotonic()
        timeout = max(0.0, min(w.deadline for w in waiting) - now)
        ready = wait([w.conn for w in waiting], timeout=timeout)
        by_conn = {id(w.conn): w for w in waiting}
        for c in ready:
            w = by_conn[id(c)]
            try:
                msg = c.recv()
            except (EOFError, OSError):
                msg = None
            if msg is None:  # the worker died
                self.stats.crashes += 1
                if w.state == "busy":
                    results[w.job] = (PARSE_ERROR, False)
                elif w.state == "starting":
                    self.stats.startup_failures += 1
                    self.stats.last_startup_error = f"exit code {w.proc.exitcode}"
                self._kill(w)
                continue
            if w.state == "starting":
                if msg[0] == "ready":
                    w.state = "idle"
                else:
                    self.stats.startup_failures += 1
                    self.stats.last_startup_error = str(msg[1])
                    logger.error("math-verify worker failed to start: %s", msg[1])
                    self._kill(w)
                continue
            results[w.job] = (str(msg[0]), bool(msg[1]))
            w.state, w.job = "idle", -1
            w.tasks += 1
            if w.tasks >= self.max_tasks_per_worker:
                self._retire(w)
        now = time.monotonic()
        for w in [w for w in self._workers if w.state in ("starting", "busy")]:
            if now < w.deadline:
                continue
            if w.state == "busy":
                results[w.job] = (TIMEOUT, False)
                self.stats.timeouts += 1
                logger.warning("math-verify item %d exceeded %.2fs; worker pid %s killed",
                               w.job, self._timeout_s, w.proc.pid)
            else:
                self.stats.startup_failures += 1
                self.stats.last_startup_error = f"not ready within {self.startup_timeout_s}s"
            self._kill(w)

    _timeout_s: float = 1.0

    def verify_many(self, items: Sequence[tuple[str, str, bool]], timeout_s: float = 1.0
                    ) -> list[tuple[str, bool]]:
        """Verify ``(gold, pred, strict)`` triples; returns ``(status, acc)`` per item, in order.

        ``timeout_s`` is the hard wall-clock limit per item, counted from when the item is handed
        to a ready worker (worker start-up is not counted). A timed-out item gives
        ``("timeout", False)`` and its worker is killed and replaced. If workers cannot be started
        (math-verify missing, 3 consecutive start-up failures), scoring stops with an error:
        a wrong reward is never returned silently.

        Raises:
            ValueError: ``timeout_s <= 0``.
            MathVerifyWorkerError: workers cannot be started.
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        n = len(items)
        results: list[tuple[str, bool] | None] = [None] * n
        if n == 0:
            return []
        with self._lock:
            self._timeout_s = float(timeout_s)
            pending = deque(range(n))
            failures_at_start = self.stats.startup_failures
            while pending or any(w.state == "busy" for w in self._workers):
                if pending:
                    if self.stats.startup_failures - failures_at_start >= 3:
                        for w in [w for w in self._workers if w.state == "busy"]:
                            self._kill(w)
                        raise MathVerifyWorkerError(
                            f"math-verify workers cannot start "
                            f"({self.stats.last_startup_error}); {len(pending)} of {n} items "
                            "unscored (is math-verify installed in this interpreter?)")
                    self._ensure_workers(len(pending) + sum(
                        w.state == "busy" for w in self._workers))
                self._poll(pending, items, results)
            self.stats.items += n
        return [r if r is not None else (PARSE_ERROR, False) for r in results]


_POOL: MathVerifyPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool(num_workers: int = 1) -> MathVerifyPool:
    """The process-wide pool, created lazily; grown (never shrunk) to ``num_workers``."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = MathVerifyPool(num_workers)
        elif num_workers > _POOL.num_workers:
            _POOL.num_workers = int(num_workers)
        return _POOL


def shutdown_pool() -> None:
    """Stop the process-wide pool's workers (idempotent). A run calls it through
    :func:`megatron_dapo.reward.executor.scoring_resources`; it is also registered with ``atexit`` for library
    callers."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


atexit.register(shutdown_pool)
