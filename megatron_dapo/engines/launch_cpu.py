"""Start our CPU engine (``python -m megatron_dapo.engines.cpu.server``; tests, CPU runs).

:func:`launch_cpu_engines` returns a :class:`~megatron_dapo.engines.launch_common.EngineProcesses`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from megatron_dapo.engines.launch_common import EngineProcesses, find_free_ports


def build_cpu_engine_command(model_path: str, *, port: int, host: str = "127.0.0.1", api_key: str | None = None,
                             seed: int = 0, max_batch_size: int = 64, num_threads: int = 1,
                             extra_args: Sequence[str] = (), python: str | None = None) -> list[str]:
    """argv of ``python -m megatron_dapo.engines.cpu.server`` for one engine (pure)."""
    cmd = [python or sys.executable, "-m", "megatron_dapo.engines.cpu.server", "--model-path", str(model_path),
           "--host", host, "--port", str(int(port)), "--seed", str(int(seed)),
           "--max-batch-size", str(int(max_batch_size)), "--num-threads", str(int(num_threads))]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd + [str(a) for a in extra_args]


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
    specs = ((build_cpu_engine_command(model_path, port=port, host=host, api_key=api_key, seed=seed + i,
                                       max_batch_size=max_batch_size, num_threads=num_threads,
                                       extra_args=extra_args),
              f"http://{host}:{port}", Path(log_dir) / f"cpu_engine_{i}.log") for i, port in enumerate(ports))
    return EngineProcesses.launch(specs, env=run_env, api_key=api_key, health_timeout_s=health_timeout_s)
