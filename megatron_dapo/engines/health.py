"""Engine health: which rollout engines have failed, and why (rank 0, a daemon thread).

:class:`EngineHealthMonitor` watches the engines :class:`~megatron_dapo.engines.engine_set.EngineSet` owns. An
engine has *failed* when

* its process has exited (``kill -9``, a crash, OOM): seen within ``poll_s``;
* its liveness route refused the connection twice in a row (the server is gone, or was never started by us);
* its liveness route has not answered for ``hang_timeout_s`` (``rollout.engine_hang_timeout_s``): a hung or stopped
  (SIGSTOP) process.

The liveness route is one the HTTP server answers itself (``probe_path``): ``/health`` on our CPU engine and vLLM,
``/model_info`` on SGLang, whose ``/health`` generates a token through the scheduler (it would add a request every
probe and fail while the engine's memory is released).

A failure is recorded once with its cause, logged as a warning, and the engine leaves rotation at once
(:meth:`~megatron_dapo.engines.protocols.EngineRotation.mark_down`): no request or control call goes to it any
more, and its running generation requests are resent to the other engines. Replacing it is the engine set's
business (at the next step boundary); the monitor skips an engine while it is being replaced (:meth:`forget`).
"""
from __future__ import annotations

import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

from .launch_common import EngineProcesses

log = logging.getLogger("megatron_dapo")


def describe_exit(returncode: int) -> str:
    """``"exited with code 1"`` / ``"killed by SIGKILL"`` for a ``Popen.returncode``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def probe_health(url: str, api_key: Optional[str], timeout_s: float = 2.0, path: str = "/health") -> str:
    """``GET url + path`` once: ``"ok"`` (HTTP 200), ``"refused"`` (nothing listens) or ``"no answer"``
    (timeout, another status, any other error)."""
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return "ok" if resp.status == 200 else "no answer"
    except urllib.error.URLError as exc:
        return "refused" if isinstance(exc.reason, ConnectionRefusedError) else "no answer"
    except ConnectionRefusedError:
        return "refused"
    except (OSError, ValueError):
        return "no answer"


@dataclass
class _Watch:
    url: str
    last_ok: float
    refusals: int = 0
    cause: Optional[str] = None


class EngineHealthMonitor:
    """Rank 0's watch over the engines (module docstring); a daemon thread from :meth:`start` to :meth:`close`.

    Args:
        urls: every engine's base URL (the client's ``engine_urls``).
        mark_down: ``(url, cause) -> None``, called once per failure (the client's ``mark_down``).
        processes: the engines' processes when this run started them (exit codes are read from them), else
            ``None`` (``rollout.engine_urls``: only ``/health`` is watched).
        hang_timeout_s: seconds without an answer on ``probe_path`` after which an engine has failed (> 0).
        api_key: ``rollout.api_key`` (sent with every probe).
        poll_s: seconds between process checks; ``probe_path`` is probed every ``probe_s`` seconds.
        probe_path: the liveness route (module docstring).

    Raises:
        ValueError: ``hang_timeout_s``, ``poll_s`` or ``probe_s`` not > 0.
    """

    def __init__(self, urls: list[str], mark_down: Callable[[str, str], object], *,
                 processes: Optional[EngineProcesses] = None, hang_timeout_s: float = 120.0,
                 api_key: Optional[str] = None, poll_s: float = 0.5, probe_s: float = 2.0,
                 probe_path: str = "/health") -> None:
        if not (hang_timeout_s > 0 and poll_s > 0 and probe_s > 0):
            raise ValueError(f"hang_timeout_s, poll_s and probe_s must be > 0 (got {hang_timeout_s}, {poll_s}, "
                             f"{probe_s})")
        self.urls = [u.rstrip("/") for u in urls]
        self._mark_down = mark_down
        self.processes = processes
        self.hang_timeout_s = float(hang_timeout_s)
        self.api_key = api_key
        self.poll_s = float(poll_s)
        self.probe_s = float(probe_s)
        self.probe_path = probe_path
        now = time.monotonic()
        self._watch = {u: _Watch(u, now) for u in self.urls}
        self._paused: set[str] = set()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._next_probe = 0.0

    # ---- state ---------------------------------------------------------------------------------------------
    def failed(self) -> dict[str, str]:
        """``{url: cause}`` of the engines that failed and were not :meth:`forget`-ten since."""
        with self._lock:
            return {u: w.cause for u, w in self._watch.items() if w.cause is not None}

    def pause(self, url: str) -> None:
        """Stop watching ``url`` (it is being replaced)."""
        with self._lock:
            self._paused.add(url)

    def forget(self, url: str) -> None:
        """``url`` has been replaced: clear its failure and watch it again from now on."""
        with self._lock:
            self._watch[url] = _Watch(url, time.monotonic())
            self._paused.discard(url)

    def process_of(self, url: str):
        """The :class:`~megatron_dapo.engines.launch_common.EngineProcess` serving ``url`` (``None``: not ours)."""
        if self.processes is None:
            return None
        return next((ep for ep in self.processes.engines if ep.url.rstrip("/") == url), None)

    # ---- checks --------------------------------------------------------------------------------------------
    def _fail(self, url: str, cause: str) -> None:
        with self._lock:
            w = self._watch[url]
            if w.cause is not None or url in self._paused:
                return
            w.cause = cause
        log.warning("rollout engine %s failed: %s; it leaves rotation", url, cause)
        try:
            self._mark_down(url, cause)
        except Exception as exc:  # noqa: BLE001 - the client may be closing; the failure stays recorded
            log.warning("taking %s out of rotation: %s", url, exc)

    def check_now(self, probe: bool = True) -> dict[str, str]:
        """One round of checks (process exit; with ``probe`` also ``/health``); returns :meth:`failed`."""
        now = time.monotonic()
        for url in self.urls:
            with self._lock:
                if url in self._paused or self._watch[url].cause is not None:
                    continue
            ep = self.process_of(url)
            rc = ep.proc.poll() if ep is not None else None
            if rc is not None:
                self._fail(url, describe_exit(rc))
                continue
            if not probe:
                continue
            answer = probe_health(url, self.api_key, timeout_s=min(2.0, self.hang_timeout_s), path=self.probe_path)
            with self._lock:
                if url in self._paused:
                    continue
                w = self._watch[url]
                if answer == "ok":
                    w.last_ok, w.refusals = time.monotonic(), 0
                    continue
                w.refusals = w.refusals + 1 if answer == "refused" else 0
                silent = now - w.last_ok
            if answer == "refused" and w.refusals >= 2:
                self._fail(url, "its connection was refused twice in a row")
            elif silent > self.hang_timeout_s:
                self._fail(url, f"{self.probe_path} has not answered for {silent:.0f} s "
                                f"(> rollout.engine_hang_timeout_s={self.hang_timeout_s:g}): hung or stopped")
        return self.failed()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            probe = time.monotonic() >= self._next_probe
            if probe:
                self._next_probe = time.monotonic() + self.probe_s
            try:
                self.check_now(probe=probe)
            except Exception as exc:  # noqa: BLE001 - a watcher must not die of one bad round
                log.warning("engine health check failed: %s", exc)

    def start(self) -> "EngineHealthMonitor":
        """Start the watching thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-health", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
