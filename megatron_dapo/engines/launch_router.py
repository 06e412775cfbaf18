"""Start and watch ``sglang-router`` (optional ``sglang-router`` package) in front of running engines.

* :func:`build_sglang_router_command` / :func:`launch_sglang_router` - ``python -m
  sglang_router.launch_router`` in front of running engines; it is ready once ``/health`` answers and
  ``/workers`` lists every engine as healthy.
* :func:`wait_router_routing` - the same wait for an externally started router (the sbatch scripts).

:class:`RouterProcess` is a :class:`~megatron_dapo.engines.launch_common.EngineProcesses` of one process.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from megatron_dapo.backend import MissingBackendError
from megatron_dapo.engines.launch_common import (EngineLaunchError, EngineProcess, EngineProcesses, _http_ok, _tail,
                                                 find_free_ports)


ROUTER_POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")
"""``--policy`` values of ``sglang_router.launch_router`` (0.3.x) usable in front of plain workers
(``manual`` needs a routing-key header per request and is not offered)."""

ROUTER_INSTALL_HINT = ("the sglang-router package is not installed; install it with "
                       "`pip install sglang-router` (or `pip install megatron_dapo[router]`)")


class RouterLaunchError(EngineLaunchError):
    """``sglang-router`` exited or did not route to every worker in time (log tail included)."""


class RouterNotInstalledError(RouterLaunchError, MissingBackendError):
    """The optional ``sglang-router`` package is not installed (message: how to install it)."""


def build_sglang_router_command(worker_urls: Sequence[str], *, port: int, host: str = "127.0.0.1",
                                policy: str = "cache_aware", api_key: str | None = None,
                                request_timeout_s: float | None = None, log_level: str = "info",
                                prometheus_port: int | None = None, extra_args: Sequence[str] = (),
                                python: str | None = None) -> list[str]:
    """argv of ``python -m sglang_router.launch_router`` in front of ``worker_urls`` (pure).

    Flags are those of ``sglang-router`` 0.3.2's CLI (``launch_router --help``): ``--worker-urls
    U1 U2 ..``, ``--host``, ``--port``, ``--policy``, ``--api-key`` (the key the router sends to the
    workers), ``--request-timeout-secs``, ``--log-level``, ``--prometheus-port`` / ``--prometheus-host``
    (the metrics listener defaults to 0.0.0.0:29000, so a second router on a node fails with
    "Address already in use" unless it gets its own port).

    Raises:
        ValueError: no / duplicate / non-``http(s)://`` worker URL, unknown ``policy``, bad port.
    """
    urls = [str(u).rstrip("/") for u in worker_urls]
    if not urls:
        raise ValueError("sglang-router needs at least one worker URL")
    for i, u in enumerate(urls):
        if not u.startswith(("http://", "https://")):
            raise ValueError(f"worker_urls[{i}]={u!r} must start with http:// or https://")
    if len(set(urls)) != len(urls):
        raise ValueError(f"duplicate worker URLs: {urls}")
    if policy not in ROUTER_POLICIES:
        raise ValueError(f"router policy {policy!r} unknown; choose one of {list(ROUTER_POLICIES)}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port {port} is not a valid TCP port")
    if log_level not in ("debug", "info", "warn", "error"):
        raise ValueError(f"log_level must be debug, info, warn or error, got {log_level!r}")
    cmd = [python or sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *urls,
           "--host", host, "--port", str(int(port)), "--policy", policy, "--log-level", log_level]
    if api_key:
        cmd += ["--api-key", api_key]
    if request_timeout_s is not None:
        cmd += ["--request-timeout-secs", str(max(1, int(request_timeout_s)))]
    if prometheus_port is not None:
        if not 0 < int(prometheus_port) < 65536:
            raise ValueError(f"prometheus_port {prometheus_port} is not a valid TCP port")
        cmd += ["--prometheus-port", str(int(prometheus_port)), "--prometheus-host", host]
    return cmd + [str(a) for a in extra_args]


def _plain_tail(path: Path | None, n: int = 40) -> str:
    """:func:`~megatron_dapo.engines.launch_common._tail` without ANSI colour codes (the router always colours its log
    lines)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", _tail(path, n))


def _http_json(url: str, api_key: str | None, timeout_s: float = 2.0):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return None, None


def router_worker_health(router_url: str, api_key: str | None = None, timeout_s: float = 2.0) -> dict[str, bool] | None:
    """``{worker_url: healthy}`` as the router sees it (``GET /workers``, or ``GET /list_workers`` of
    older routers, which lists URLs only); ``None`` when the router does not answer.

    Source: sglang-router's HTTP API (``/workers`` -> ``{"workers": [{"url", "is_healthy", ...}]}``).
    """
    status, data = _http_json(router_url.rstrip("/") + "/workers", api_key, timeout_s)
    if status == 200 and isinstance(data, dict) and isinstance(data.get("workers"), list):
        return {str(w.get("url", "")).rstrip("/"): bool(w.get("is_healthy", True))
                for w in data["workers"] if isinstance(w, dict)}
    status, data = _http_json(router_url.rstrip("/") + "/list_workers", api_key, timeout_s)
    if status == 200 and isinstance(data, dict) and isinstance(data.get("urls"), list):
        return {str(u).rstrip("/"): True for u in data["urls"]}
    return None


@dataclass(eq=False)
class RouterProcess(EngineProcesses):
    """A started ``sglang-router`` (an :class:`~megatron_dapo.engines.launch_common.EngineProcesses` of one process:
    same process-group stop, atexit / SIGTERM hooks and context-manager use); ``url`` is the router's base
    URL and ``worker_urls`` the engines behind it."""

    worker_urls: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The router's ``http://host:port``."""
        return self.engines[0].url

    def wait_routing(self, timeout_s: float = 120.0, poll_s: float = 0.25) -> None:
        """Block until the router answers ``/health`` AND lists every worker as healthy (the router
        is healthy before its background worker registration finishes).

        Raises:
            RouterLaunchError: the router exited or ``timeout_s`` passed (router stopped first); the
                message names the missing / unhealthy workers and holds the router log's last lines.
        """
        want = [u.rstrip("/") for u in self.worker_urls]
        seen: dict[str, bool] | None = None

        def routing(ep: EngineProcess) -> bool:
            nonlocal seen
            if not _http_ok(ep.url + "/health", ep.api_key):
                return False
            seen = router_worker_health(ep.url, ep.api_key)
            return seen is not None and all(seen.get(u) for u in want)

        def exited(ep: EngineProcess, rc: int) -> Exception:
            return RouterLaunchError(
                f"sglang-router {ep.url} exited with code {rc} before routing\ncommand: {' '.join(ep.cmd)}\n"
                f"--- last lines of {ep.log_path} ---\n{_plain_tail(ep.log_path)}")

        def timed_out(ep: EngineProcess) -> Exception:
            missing = [u for u in want if not (seen or {}).get(u)]
            state = "did not answer /health" if seen is None else f"workers not (yet) healthy: {missing}"
            return RouterLaunchError(
                f"sglang-router {ep.url} not routing after {timeout_s:.0f}s ({state})\n"
                f"command: {' '.join(ep.cmd)}\n--- last lines of {ep.log_path} ---\n{_plain_tail(ep.log_path)}")

        self.wait_until(routing, timeout_s, poll_s, exited, timed_out)


def launch_sglang_router(worker_urls: Sequence[str], *, host: str = "127.0.0.1", port: int | None = None,
                         policy: str = "cache_aware", timeout: float = 120.0,
                         log_path: str | os.PathLike = "logs/router/sglang_router.log",
                         extra_args: Sequence[str] = (), api_key: str | None = None,
                         request_timeout_s: float | None = None, log_level: str = "info",
                         prometheus_port: int | None = None, env: dict | None = None) -> RouterProcess:
    """Start ``sglang-router`` in front of running engines and wait until it routes to all of them.

    Generation sent to the returned ``.url`` is spread over ``worker_urls`` by ``policy`` (see
    :data:`ROUTER_POLICIES`); control calls (weight updates, memory release) should still go to
    the engines directly (:class:`~megatron_dapo.engines.client.EngineClient` with ``router_url``).

    Args:
        worker_urls: engine base URLs (already healthy).
        host, port: where the router listens (``port=None``: a free port).
        policy: ``--policy`` (``cache_aware`` | ``round_robin`` | ``random`` | ``power_of_two``).
        timeout: seconds to wait for ``/health`` plus every worker registered and healthy.
        log_path: the router's stdout / stderr.
        extra_args: appended verbatim (e.g. ``["--retry-max-retries", "2"]``).
        api_key: the engines' API key (``--api-key``: sent by the router to the workers; the router
            then also requires it from its own clients, ``/workers`` included).
        request_timeout_s: ``--request-timeout-secs`` (router default 1800).
        log_level: ``--log-level`` (``debug`` shows every worker the router picks).
        prometheus_port: the router's metrics port (``None``: a free port, not the fixed default
            29000 that a second router on the node would collide with).
        env: process environment (default: this one).

    Returns:
        :class:`RouterProcess` - use as a context manager;
        :meth:`~megatron_dapo.engines.launch_common.EngineProcesses.stop` SIGTERMs then SIGKILLs its process
        group (no orphans).

    Raises:
        RouterLaunchError: ``sglang_router`` not installed (also a
            :class:`~megatron_dapo.backend.MissingBackendError`; the message says ``pip install
            sglang-router``), the router exited (e.g. a bad flag) or did not route in time - with its log's last lines.
        ValueError: bad arguments (see :func:`build_sglang_router_command`).
    """
    if importlib.util.find_spec("sglang_router") is None:
        raise RouterNotInstalledError(ROUTER_INSTALL_HINT)
    free = find_free_ports(2, host)
    port = free[0] if port is None else port
    prometheus_port = free[1] if prometheus_port is None else prometheus_port
    cmd = build_sglang_router_command(worker_urls, port=port, host=host, policy=policy, api_key=api_key,
                                      request_timeout_s=request_timeout_s, log_level=log_level,
                                      prometheus_port=prometheus_port, extra_args=extra_args)
    group = RouterProcess(worker_urls=[str(u).rstrip("/") for u in worker_urls])
    try:
        group.start(cmd, f"http://{host}:{int(port)}", Path(log_path), env=env, api_key=api_key)
        group.wait_routing(timeout)
    except BaseException:
        group.stop()
        raise
    return group


def wait_router_routing(router_url: str, worker_urls: Sequence[str], timeout_s: float = 600.0,
                        poll_s: float = 1.0, pid: int | None = None, api_key: str | None = None) -> list[str]:
    """Wait until the router at ``router_url`` answers ``/health`` and lists every worker as
    healthy (an externally started router, e.g. an srun step of the sbatch script).

    Returns:
        the workers not (yet) healthy on the router - empty on success; all of them when the router
        never answered - after ``timeout_s`` seconds or once process ``pid`` (if given) is gone.
    """
    want = [str(u).rstrip("/") for u in worker_urls]
    deadline = time.monotonic() + timeout_s
    while True:
        healthy = _http_ok(router_url.rstrip("/") + "/health", api_key)
        seen = router_worker_health(router_url, api_key) if healthy else None
        missing = [u for u in want if not (seen or {}).get(u)]
        if not missing:
            return []
        alive = True
        if pid is not None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:
                pass
        if not alive or time.monotonic() >= deadline:
            return missing
        time.sleep(poll_s)
