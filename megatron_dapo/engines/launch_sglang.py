"""Start SGLang servers (``python -m sglang.launch_server``): on GPU nodes, or on CPU from ``.venv-sglang``.

* :func:`build_sglang_command` / :func:`launch_sglang_servers` - ``python -m sglang.launch_server``
  with SGLang's server flags (``--model-path --host --port --tp-size --mem-fraction-static
  --base-gpu-id --enable-memory-saver --api-key``).  ``colocated=True`` adds
  ``--enable-memory-saver`` so ``/release_memory_occupation`` can free GPU memory while the
  Megatron actor trains on the same GPUs.
* :func:`sglang_cpu_args` / :func:`sglang_cpu_env` / :func:`checkpoint_dtype` - the flags, environment
  and ``--dtype`` of a CPU server.
* :func:`serve_sglang` - ``python -m megatron_dapo.engines.launch serve-sglang`` (exec one server).

:func:`launch_sglang_servers` returns a :class:`~megatron_dapo.engines.launch_common.EngineProcesses`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

from megatron_dapo.backend import MissingBackendError, has_cuda
from megatron_dapo.engines.launch_common import EngineProcesses, REPO_ROOT, default_engine_python, find_free_ports


SGLANG_CPU_SHIMS = REPO_ROOT / "tools" / "engines" / "sglang_shims"
"""Put on a CPU SGLang server's ``PYTHONPATH``: the import-time ``sgl_kernel`` stand-in and sitecustomize."""


SGLANG_CPU_MAX_TOTAL_TOKENS = 4096
"""``--max-total-tokens`` of a CPU SGLang server (KV pool size in tokens; SGLang sizes it from GPU memory
otherwise, which a CPU run does not have)."""


def sglang_cpu_args(dtype: str = "auto", max_total_tokens: int = SGLANG_CPU_MAX_TOTAL_TOKENS) -> list[str]:
    """SGLang server flags that make 0.5.x run on a CPU without AMX (pure; measured, see README "Engines").

    ``--device cpu`` with the pure-torch ``torch_native`` attention and ``pytorch`` sampling backends,
    CUDA graphs off for decode and prefill, a fixed KV pool of ``max_total_tokens`` tokens, no warm-up
    request (start-up is ~2 min of imports already), the weights' ``dtype`` (``auto``: the checkpoint's
    ``config.json``; logprob checks need ``float32``) and ``--sleep-on-idle``: without it SGLang's scheduler
    polls its sockets in a busy loop and holds one core at 100 % while idle (measured 1.01 cores over 20 s
    on the 2-core CI machine, which halves the speed of a trainer sharing it); with it the scheduler blocks
    in ``zmq.Poller.poll`` until a request arrives.

    Raises:
        ValueError: ``max_total_tokens < 1`` or a dtype SGLang does not know.
    """
    if int(max_total_tokens) < 1:
        raise ValueError(f"max_total_tokens must be >= 1, got {max_total_tokens}")
    if dtype not in ("auto", "float32", "bfloat16", "float16", "half", "float"):
        raise ValueError(f"dtype {dtype!r} is not an SGLang --dtype (auto, float32, bfloat16, float16)")
    return ["--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
            "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
            "--max-total-tokens", str(int(max_total_tokens)), "--skip-server-warmup", "--dtype", dtype,
            "--sleep-on-idle"]


def checkpoint_dtype(model_path: str, dtype: str = "auto") -> str:
    """``dtype`` unless it is ``auto``; then the checkpoint's own ``config.json`` dtype (``dtype`` /
    ``torch_dtype``: ``float32``, ``bfloat16``, ``float16``), else ``auto``.

    SGLang's ``--dtype auto`` serves a float32 checkpoint in float16 (as vLLM does), which breaks the
    fp32 logprob check (~1e-4 .. 1e-1 off), so the launchers pass the checkpoint's dtype explicitly.
    """
    if dtype != "auto":
        return dtype

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
    environment of :func:`sglang_cpu_env`, interpreter from
    :func:`~megatron_dapo.engines.launch_common.default_engine_python` (the ``.venv-sglang`` of ``make engines``).
    Start-up on CPU takes ~2 min (imports).

    Args:
        python: interpreter to run (overrides ``engine_python``); default
            ``default_engine_python("sglang", engine_python)``.
        engine_python: ``rollout.engine_python``.
        device: ``cuda`` / ``cpu``; ``None``: ``cuda`` when torch sees a GPU.
        dtype, max_total_tokens: see :func:`build_sglang_command`; ``dtype="auto"`` becomes the
            checkpoint's dtype (:func:`checkpoint_dtype`).

    Returns:
        :class:`~megatron_dapo.engines.launch_common.EngineProcesses` (use as a context manager); stopping it also reaps
        each server's scheduler and detokenizer processes.

    Raises:
        MissingBackendError: no interpreter with sglang (message names ``make engines``).
        EngineLaunchError: an engine exited / timed out (log tail included); ValueError: bad args.
    """
    if num_engines < 1:
        raise ValueError(f"num_engines must be >= 1, got {num_engines}")
    if device is None:
        device = "cuda" if has_cuda() else "cpu"
    python = python or default_engine_python("sglang", engine_python)
    dtype = checkpoint_dtype(model_path, dtype)
    run_env = sglang_cpu_env(env) if device == "cpu" else (None if env is None else dict(env))
    ports = find_free_ports(num_engines, host) if base_port is None else \
        [base_port + i * port_stride for i in range(num_engines)]
    specs = ((build_sglang_command(model_path, port=port, host=host, tp_size=tp_size,
                                   mem_fraction_static=mem_fraction_static, colocated=colocated, api_key=api_key,
                                   base_gpu_id=first_gpu + i * tp_size, extra_args=extra_args, python=python,
                                   device=device, dtype=dtype, max_total_tokens=max_total_tokens),
              f"http://{host}:{port}", Path(log_dir) / f"sglang_{i}.log") for i, port in enumerate(ports))
    return EngineProcesses.launch(specs, env=run_env, api_key=api_key, health_timeout_s=health_timeout_s)


def serve_sglang(args) -> int:
    """``serve-sglang``: replace this process by the SGLang server (slurm/engines_on_node.sh runs it per
    engine, so the step's signals reach the server itself).  A missing engine venv: one line, exit 2."""
    if args.device is None:
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
