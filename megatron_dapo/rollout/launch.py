"""Start rollout engine processes (SGLang on GPU nodes, the CPU engine elsewhere) and reap them.

* :func:`build_sglang_command` / :func:`launch_sglang_servers` - ``python -m sglang.launch_server``
  with SGLang's server flags (``--model-path --host --port --tp-size --mem-fraction-static
  --base-gpu-id --enable-memory-saver --api-key``).  ``colocated=True`` adds
  ``--enable-memory-saver`` so ``/release_memory_occupation`` can free GPU memory while the
  Megatron actor trains on the same GPUs.
* :func:`launch_cpu_engines` - ``python -m megatron_dapo.rollout.cpu_engine`` (tests, CPU runs).
* :func:`build_vllm_command` - the vLLM OpenAI-compatible server (second backend, see
  :mod:`megatron_dapo.rollout.vllm_backend`).

Every launcher returns an :class:`EngineProcesses`: a context manager that waits for ``/health``
(raising :class:`EngineLaunchError` with the last log lines when an engine exits or never
becomes healthy) and stops ALL children on exit, Ctrl-C, SIGTERM or interpreter exit (atexit):
each child runs in its own process group which is SIGTERMed, then SIGKILLed after a grace period;
on Linux children also get ``PR_SET_PDEATHSIG`` so they die if the launcher is killed -9.
"""
from __future__ import annotations

import atexit
import ctypes
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
from typing import Sequence


class EngineLaunchError(RuntimeError):
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


def build_sglang_command(model_path: str, *, port: int, host: str = "127.0.0.1", tp_size: int = 1,
                         mem_fraction_static: float | None = 0.8, colocated: bool = False,
                         api_key: str | None = None, base_gpu_id: int = 0,
                         extra_args: Sequence[str] = (), python: str | None = None) -> list[str]:
    """Build the ``python -m sglang.launch_server`` argv for one engine (pure).

    Args:
        model_path: HF model dir / hub id.
        port, host: HTTP endpoint.
        tp_size: tensor-parallel GPUs per engine (``--tp-size``).
        mem_fraction_static: ``--mem-fraction-static`` (weights + KV pool share of GPU memory);
            ``None`` leaves SGLang's default.
        colocated: engine shares GPUs with the trainer -> ``--enable-memory-saver``.
        api_key: ``--api-key``.
        base_gpu_id: first GPU index of this engine (``--base-gpu-id``).
        extra_args: appended verbatim (e.g. ``["--random-seed", "1"]``).
        python: interpreter (default ``sys.executable``).

    Raises:
        ValueError: bad tp_size / mem_fraction_static / port.
    """
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if mem_fraction_static is not None and not 0.0 < mem_fraction_static < 1.0:
        raise ValueError(f"mem_fraction_static must be in (0, 1), got {mem_fraction_static}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port {port} is not a valid TCP port")
    cmd = [python or sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--host", host, "--port", str(int(port)), "--tp-size", str(int(tp_size)),
           "--base-gpu-id", str(int(base_gpu_id))]
    if mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(mem_fraction_static)]
    if colocated:
        cmd.append("--enable-memory-saver")
    if api_key:
        cmd += ["--api-key", api_key]
    cmd += [str(a) for a in extra_args]
    return cmd


def build_cpu_engine_command(model_path: str, *, port: int, host: str = "127.0.0.1", api_key: str | None = None,
                             seed: int = 0, max_batch_size: int = 64, num_threads: int = 1,
                             extra_args: Sequence[str] = (), python: str | None = None) -> list[str]:
    """argv of ``python -m megatron_dapo.rollout.cpu_engine`` for one engine (pure)."""
    cmd = [python or sys.executable, "-m", "megatron_dapo.rollout.cpu_engine", "--model-path", str(model_path),
           "--host", host, "--port", str(int(port)), "--seed", str(int(seed)),
           "--max-batch-size", str(int(max_batch_size)), "--num-threads", str(int(num_threads))]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd + [str(a) for a in extra_args]


def build_vllm_command(model_path: str, *, port: int, host: str = "127.0.0.1", tp_size: int = 1,
                       gpu_memory_utilization: float = 0.8, enable_sleep_mode: bool = False,
                       api_key: str | None = None, served_model_name: str | None = None,
                       logprobs_mode: str | None = "processed_logprobs", seed: int | None = None,
                       extra_args: Sequence[str] = (), python: str | None = None) -> list[str]:
    """argv of vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``).

    Launch it with env ``VLLM_SERVER_DEV_MODE=1`` (see :func:`vllm_env`) so the dev endpoints used
    for RL (``/sleep``, ``/wake_up``, ``/collective_rpc``) exist.  ``logprobs_mode=
    "processed_logprobs"`` makes returned logprobs those of the temperature-scaled (and
    top-k/top-p-processed) distribution; vLLM's default is the raw-logit distribution.

    Raises:
        ValueError: bad tp_size / gpu_memory_utilization / port.
    """
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port {port} is not a valid TCP port")
    cmd = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
           "--host", host, "--port", str(int(port)), "--tensor-parallel-size", str(int(tp_size)),
           "--gpu-memory-utilization", str(gpu_memory_utilization)]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if enable_sleep_mode:
        cmd.append("--enable-sleep-mode")
    if logprobs_mode:
        cmd += ["--logprobs-mode", logprobs_mode]
    if seed is not None:
        cmd += ["--seed", str(int(seed))]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd + [str(a) for a in extra_args]


def vllm_env(base: dict | None = None) -> dict:
    """Environment for a vLLM server with the RL dev endpoints enabled."""
    env = dict(os.environ if base is None else base)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    return env


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


@dataclass
class EngineProcess:
    """One started engine: its argv, URL, log file and ``Popen``."""

    cmd: list[str]
    url: str
    log_path: Path
    proc: subprocess.Popen
    api_key: str | None = None


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
        ep = EngineProcess(cmd=cmd, url=url, log_path=log_path, proc=proc, api_key=api_key)
        self.engines.append(ep)
        return ep

    def wait_healthy(self, timeout_s: float = 120.0, poll_s: float = 0.25) -> None:
        """Block until every engine answers ``GET /health`` with 200.

        Raises:
            EngineLaunchError: an engine exited, or ``timeout_s`` passed; the message holds the
                URL, the command and the last log lines.  All engines are stopped first.
        """
        deadline = time.monotonic() + timeout_s
        pending = list(self.engines)
        while pending:
            for ep in list(pending):
                rc = ep.proc.poll()
                if rc is not None:
                    self.stop()
                    raise EngineLaunchError(
                        f"engine {ep.url} exited with code {rc} before becoming healthy\n"
                        f"command: {' '.join(ep.cmd)}\n--- last lines of {ep.log_path} ---\n{_tail(ep.log_path)}")
                if _http_ok(ep.url + "/health", ep.api_key):
                    pending.remove(ep)
            if not pending:
                return
            if time.monotonic() > deadline:
                ep = pending[0]
                self.stop()
                raise EngineLaunchError(
                    f"engine {ep.url} not healthy after {timeout_s:.0f}s\ncommand: {' '.join(ep.cmd)}\n"
                    f"--- last lines of {ep.log_path} ---\n{_tail(ep.log_path)}")
            time.sleep(poll_s)

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to engine ``index``'s process group (fault-injection / tests)."""
        ep = self.engines[index]
        try:
            os.killpg(ep.proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            ep.proc.wait(timeout=30)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM each process group, wait up to ``grace_s``, then SIGKILL; idempotent."""
        live = [ep for ep in self.engines if ep.proc.poll() is None]
        for ep in live:
            try:
                os.killpg(ep.proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        for ep in live:
            try:
                ep.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for ep in self.engines:
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

    def __enter__(self) -> "EngineProcesses":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _http_ok(url: str, api_key: str | None, timeout_s: float = 2.0) -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def launch_sglang_servers(model_path: str, *, num_engines: int = 1, tp_size: int = 1,
                          mem_fraction_static: float | None = 0.8, colocated: bool = False,
                          host: str = "127.0.0.1", base_port: int = 30000, port_stride: int = 10,
                          api_key: str | None = None, extra_args: Sequence[str] = (),
                          log_dir: str | os.PathLike = "logs/sglang", health_timeout_s: float = 900.0,
                          first_gpu: int = 0, env: dict | None = None) -> EngineProcesses:
    """Start ``num_engines`` SGLang servers on this node and wait until all are healthy.

    Engine ``i`` listens on ``base_port + i * port_stride`` and uses GPUs
    ``first_gpu + i * tp_size .. + tp_size - 1``; logs go to ``log_dir/sglang_<i>.log``.

    Returns:
        :class:`EngineProcesses` (use as a context manager).

    Raises:
        EngineLaunchError: an engine exited / timed out (log tail included); ValueError: bad args.
    """
    if num_engines < 1:
        raise ValueError(f"num_engines must be >= 1, got {num_engines}")
    group = EngineProcesses()
    try:
        for i in range(num_engines):
            port = base_port + i * port_stride
            cmd = build_sglang_command(model_path, port=port, host=host, tp_size=tp_size,
                                       mem_fraction_static=mem_fraction_static, colocated=colocated,
                                       api_key=api_key, base_gpu_id=first_gpu + i * tp_size,
                                       extra_args=extra_args)
            group.start(cmd, f"http://{host}:{port}", Path(log_dir) / f"sglang_{i}.log", env=env, api_key=api_key)
        group.wait_healthy(health_timeout_s)
    except BaseException:
        group.stop()
        raise
    return group


def launch_cpu_engines(model_path: str, num_engines: int = 1, *, host: str = "127.0.0.1",
                       base_port: int | None = None, api_key: str | None = None, seed: int = 0,
                       max_batch_size: int = 64, num_threads: int = 1, extra_args: Sequence[str] = (),
                       log_dir: str | os.PathLike = "logs/cpu_engine", health_timeout_s: float = 120.0,
                       env: dict | None = None) -> EngineProcesses:
    """Start ``num_engines`` CPU engines (engine ``i`` seeded ``seed + i``) and wait for health.

    Ports: ``base_port + i`` or, when ``base_port`` is None, free ports picked by the OS.

    Raises:
        EngineLaunchError: an engine exited / timed out (log tail included); ValueError: bad args.
    """
    if num_engines < 1:
        raise ValueError(f"num_engines must be >= 1, got {num_engines}")
    if not os.path.isdir(model_path):
        raise ValueError(f"model_path {model_path!r} is not a directory")
    ports = find_free_ports(num_engines, host) if base_port is None else [base_port + i for i in range(num_engines)]
    run_env = dict(os.environ if env is None else env)
    repo_root = str(Path(__file__).resolve().parents[2])
    run_env["PYTHONPATH"] = repo_root + (os.pathsep + run_env["PYTHONPATH"] if run_env.get("PYTHONPATH") else "")
    group = EngineProcesses()
    try:
        for i, port in enumerate(ports):
            cmd = build_cpu_engine_command(model_path, port=port, host=host, api_key=api_key, seed=seed + i,
                                           max_batch_size=max_batch_size, num_threads=num_threads,
                                           extra_args=extra_args)
            group.start(cmd, f"http://{host}:{port}", Path(log_dir) / f"cpu_engine_{i}.log", env=run_env,
                        api_key=api_key)
        group.wait_healthy(health_timeout_s)
    except BaseException:
        group.stop()
        raise
    return group
