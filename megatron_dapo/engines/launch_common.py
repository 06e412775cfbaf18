"""What every rollout-engine launcher shares: the engine interpreter, free ports and the engine processes.

* :func:`default_engine_python` - the interpreter of real SGLang / vLLM servers (this one, or the engine venv
  of ``make engines``).
* :func:`find_free_ports` - free TCP ports for engines and routers.
* :class:`EngineProcesses` / :class:`EngineProcess` / :func:`descendant_pids` - start, health-wait and reap
  engine processes.

The launchers live in :mod:`megatron_dapo.engines.launch_sglang`, :mod:`megatron_dapo.engines.launch_vllm`,
:mod:`megatron_dapo.engines.launch_cpu` and :mod:`megatron_dapo.engines.launch_router`.

Every launcher returns an :class:`EngineProcesses`: a context manager that waits for ``/health``
(raising :class:`EngineLaunchError` with the last log lines when an engine exits or never
becomes healthy) and stops ALL children on exit, Ctrl-C, SIGTERM or interpreter exit (atexit):
each child runs in its own process group which is SIGTERMed, then SIGKILLed after a grace period;
on Linux children also get ``PR_SET_PDEATHSIG`` so they die if the launcher is killed -9.
"""
from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from megatron_dapo.backend import MissingBackendError
from megatron_dapo.errors import MegatronDapoError


REPO_ROOT = Path(__file__).resolve().parents[2]
"""The source checkout (engine venvs and the SGLang CPU shims live here on CPU machines)."""
ENGINE_VENVS = {"sglang": ".venv-sglang", "vllm": ".venv-vllm"}
"""Engine backend -> its own venv folder under :data:`REPO_ROOT` (``make engines`` builds them)."""


_ENGINE_MODULES = {"sglang": "sglang", "vllm": "vllm"}


def default_engine_python(backend: str, configured: str | None = None) -> str:
    """The interpreter that runs real ``backend`` servers (``rollout.engine_python``).

    Order: ``configured`` (must be an executable file); this interpreter when it can import the engine
    package (GPU nodes, NGC containers); else ``$MEGATRON_DAPO_ENGINE_VENV_ROOT/<venv>/bin/python`` or
    ``REPO_ROOT/<venv>/bin/python`` with ``<venv>`` from :data:`ENGINE_VENVS` (built by ``make engines``).

    Raises:
        ValueError: ``backend`` is not ``sglang`` or ``vllm``.
        MissingBackendError: nothing found; the message names ``make engines`` and ``rollout.engine_python``.
    """
    if backend not in ENGINE_VENVS:
        raise ValueError(f"no engine venv for backend {backend!r} (sglang or vllm)")
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise MissingBackendError(f"rollout.engine_python={configured!r} is not an executable file (run `make "
                                      f"engines` to build {ENGINE_VENVS[backend]}, or unset it)")
        return configured

    if importlib.util.find_spec(_ENGINE_MODULES[backend]) is not None:
        return sys.executable
    roots = [Path(os.environ["MEGATRON_DAPO_ENGINE_VENV_ROOT"])] if os.environ.get("MEGATRON_DAPO_ENGINE_VENV_ROOT") else []
    for root in roots + [REPO_ROOT]:
        cand = root / ENGINE_VENVS[backend] / "bin" / "python"
        if cand.is_file():
            return str(cand)
    raise MissingBackendError(
        f"rollout.backend={backend} needs a {backend} interpreter: run `make engines` (builds "
        f"{ENGINE_VENVS[backend]}) or set rollout.engine_python")


class EngineLaunchError(MegatronDapoError, RuntimeError):
    """An engine process exited or did not become healthy in time (message has its log tail)."""


def find_free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``n`` distinct currently-free TCP ports on ``host`` (bind to port 0)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _tail(path: Path | None, n: int = 40) -> str:
    if path is None or not path.exists():
        return "(no log)"
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(lines[-n:])


def descendant_pids(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...) from ``/proc`` (Linux; ``[]``
    elsewhere).  An SGLang server's scheduler and detokenizer are its children."""
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(name))
    out, todo = [], [int(pid)]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_pids(pids: Sequence[int], sig: int = signal.SIGKILL) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class EngineProcess:
    """One started engine: its argv, URL, log file, ``Popen`` and environment (``None``: inherited)."""

    cmd: list[str]
    url: str
    log_path: Path
    proc: subprocess.Popen
    api_key: str | None = None
    env: dict | None = None


_LIVE: "weakref.WeakSet[EngineProcesses]" = weakref.WeakSet()
_HOOKS_INSTALLED = False
_HOOK_LOCK = threading.Lock()


def _stop_all_live() -> None:
    for group in list(_LIVE):
        group.stop()


def _install_hooks() -> None:
    """atexit + SIGTERM/SIGHUP -> stop children (only replaces default handlers, main thread only)."""
    global _HOOKS_INSTALLED
    with _HOOK_LOCK:
        if _HOOKS_INSTALLED:
            return
        _HOOKS_INSTALLED = True
        atexit.register(_stop_all_live)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                def handler(signum, frame):
                    _stop_all_live()
                    raise SystemExit(128 + signum)
                signal.signal(sig, handler)


@dataclass(eq=False)
class EngineProcesses:
    """A set of engine processes; stops them all on ``__exit__`` / :meth:`stop` / exit hooks."""

    engines: list[EngineProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        _install_hooks()
        _LIVE.add(self)

    @property
    def urls(self) -> list[str]:
        """Base URLs (``http://host:port``) in launch order."""
        return [e.url for e in self.engines]

    @classmethod
    def launch(cls, specs: Iterable[tuple[list[str], str, Path]], *, env: dict | None = None,
               api_key: str | None = None, health_timeout_s: float = 120.0) -> "EngineProcesses":
        """Start one engine per ``(command, base URL, log path)`` of ``specs`` (:meth:`start`; ``specs`` may be
        a generator that builds each command) and wait until every engine answers ``/health``
        (:meth:`wait_healthy`, ``health_timeout_s`` seconds).

        Raises:
            EngineLaunchError: an engine exited or did not become healthy in time; anything raised while
                building or spawning a command. In every case (Ctrl-C included) the engines already started
                are stopped first.
        """
        group = cls()
        try:
            for cmd, url, log_path in specs:
                group.start(cmd, url, Path(log_path), env=env, api_key=api_key)
            group.wait_healthy(health_timeout_s)
        except BaseException:
            group.stop()
            raise
        return group

    def start(self, cmd: list[str], url: str, log_path: Path, env: dict | None = None,
              api_key: str | None = None) -> EngineProcess:
        """Spawn one engine in its own session / process group, logging to ``log_path``."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True,
                                    preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None)
        finally:
            log.close()
        ep = EngineProcess(cmd=cmd, url=url, log_path=log_path, proc=proc, api_key=api_key, env=env)
        self.engines.append(ep)
        return ep

    def relaunch(self, index: int, health_timeout_s: float = 120.0, grace_s: float = 10.0) -> EngineProcess:
        """Replace engine ``index``: stop its whole process tree for good (SIGTERM, then SIGKILL after ``grace_s``;
        a stopped or hung process included), start the same command on the same URL (its log is appended to,
        after a marker line) and wait until it answers ``/health``.

        Raises:
            EngineLaunchError: the new process exited or was not healthy within ``health_timeout_s`` (it is
                stopped; the other engines keep running).
        """
        old = self.engines[index]
        _stop_engines([old], grace_s)
        with open(old.log_path, "ab") as fh:
            fh.write(f"\n===== megatron_dapo: engine relaunched at {time.strftime('%F %T')} =====\n".encode())
        self.start(old.cmd, old.url, old.log_path, env=old.env, api_key=old.api_key)
        new = self.engines.pop()
        self.engines[index] = new
        one = EngineProcesses([new])  # the one engine (its exit hooks stop it, as this group's do)
        try:
            one.wait_healthy(health_timeout_s)
        except BaseException:
            _stop_engines([new], grace_s)
            raise
        return new

    def wait_healthy(self, timeout_s: float = 120.0, poll_s: float = 0.25) -> None:
        """Block until every engine answers ``GET /health`` with 200.

        Raises:
            EngineLaunchError: an engine exited, or ``timeout_s`` passed; the message holds the
                URL, the command and the last log lines.  All engines are stopped first.
        """
        def exited(ep: EngineProcess, rc: int) -> Exception:
            return EngineLaunchError(
                f"engine {ep.url} exited with code {rc} before becoming healthy\n"
                f"command: {' '.join(ep.cmd)}\n--- last lines of {ep.log_path} ---\n{_tail(ep.log_path)}")

        def timed_out(ep: EngineProcess) -> Exception:
            return EngineLaunchError(
                f"engine {ep.url} not healthy after {timeout_s:.0f}s\ncommand: {' '.join(ep.cmd)}\n"
                f"--- last lines of {ep.log_path} ---\n{_tail(ep.log_path)}")

        self.wait_until(lambda ep: _http_ok(ep.url + "/health", ep.api_key), timeout_s, poll_s, exited, timed_out)

    def wait_until(self, ready: Callable[[EngineProcess], bool], timeout_s: float, poll_s: float,
                   exited: Callable[[EngineProcess, int], Exception],
                   timed_out: Callable[[EngineProcess], Exception]) -> None:
        """Poll every ``poll_s`` seconds until ``ready(engine)`` has been true once for every engine.

        Raises:
            Exception: ``exited(engine, returncode)`` when an engine's process has exited, or
                ``timed_out(first engine not ready)`` once ``timeout_s`` seconds have passed; all engines
                are stopped first.
        """
        deadline = time.monotonic() + timeout_s
        pending = list(self.engines)
        while pending:
            for ep in list(pending):
                rc = ep.proc.poll()
                if rc is not None:
                    self.stop()
                    raise exited(ep, rc)
                if ready(ep):
                    pending.remove(ep)
            if not pending:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise timed_out(pending[0])
            time.sleep(poll_s)

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to engine ``index``'s process group (fault-injection / tests)."""
        ep = self.engines[index]
        family = descendant_pids(ep.proc.pid) if sig == signal.SIGKILL else []
        try:
            os.killpg(ep.proc.pid, sig)
        except ProcessLookupError:
            pass
        _kill_pids(family, sig)
        if sig == signal.SIGKILL:
            ep.proc.wait(timeout=30)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM each process group, wait up to ``grace_s``, then SIGKILL the groups and every
        descendant seen before the SIGTERM (children that left the group included); idempotent."""
        _stop_engines(self.engines, grace_s)

    def __enter__(self) -> "EngineProcesses":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop_engines(engines: Sequence[EngineProcess], grace_s: float) -> None:
    """:meth:`EngineProcesses.stop` of ``engines``: a stopped (SIGSTOP) process gets SIGCONT with the SIGTERM so
    that it can exit; SIGKILL ends whatever is left after ``grace_s``."""
    live = [ep for ep in engines if ep.proc.poll() is None]
    family = [p for ep in live for p in descendant_pids(ep.proc.pid)]
    for ep in live:
        for sig in (signal.SIGTERM, signal.SIGCONT):
            try:
                os.killpg(ep.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + grace_s
    for ep in live:
        try:
            ep.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for ep in engines:
        # also reap anything left in the group (e.g. SGLang's scheduler subprocesses)
        try:
            os.killpg(ep.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if ep.proc.poll() is None:
            try:
                ep.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
    _kill_pids(family)


def _http_ok(url: str, api_key: str | None, timeout_s: float = 2.0) -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False
