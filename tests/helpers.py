"""Utilities shared by the test modules (they import these and the fixtures of ``conftest.py``, never each other).

* :func:`repo_env` - the environment of a subprocess that imports this checkout (``PYTHONPATH``, one OpenMP thread);
* :func:`run_train` / :func:`run_cli` - the real CLI (``python -m megatron_dapo.train`` / ``megatron_dapo.cli``) in a
  subprocess, single process or under ``torchrun``;
* :func:`fail_message` - a finished subprocess's exit status and output tails, for an assertion message;
* :func:`read_steps` / :func:`read_scalars` - a run's ``steps.jsonl`` and TensorBoard scalars;
* :func:`hf_logprobs` - transformers fp32 log-probs of a token sequence (the reference the engines and the actor
  are checked against).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Union

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CONFIG = str(REPO_ROOT / "examples" / "tiny-cpu" / "dapo.yaml")
"""The CPU demo config (``examples/tiny-cpu/dapo.yaml``), the base of the end-to-end runs."""


def repo_env(base: dict | None = None) -> dict:
    """``base`` (default ``os.environ``) with this checkout first on ``PYTHONPATH`` and ``OMP_NUM_THREADS=1`` unless
    set: what a subprocess of the project needs to import the code under test."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_train(overrides: list[str], nproc: int = 1, timeout: int = 600, config: str = CONFIG
              ) -> subprocess.CompletedProcess:
    """``python -m megatron_dapo.train <config> <overrides>`` (``torchrun`` with ``nproc`` > 1) from the repository
    root; output captured as text. Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
    if nproc == 1:
        cmd = [PY, "-m", "megatron_dapo.train", config] + overrides
    else:
        from megatron_dapo.actor.parallel import free_port

        cmd = [PY, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
               "-m", "megatron_dapo.train", config] + overrides
    return subprocess.run(cmd, cwd=REPO_ROOT, env=repo_env(), capture_output=True, text=True, timeout=timeout)


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m megatron_dapo.cli <args>`` from the repository root (``env`` default :func:`repo_env`)."""
    return subprocess.run([PY, "-m", "megatron_dapo.cli", *args], cwd=REPO_ROOT, env=env or repo_env(),
                          capture_output=True, text=True, timeout=timeout)


def fail_message(proc: subprocess.CompletedProcess, stdout_chars: int = 4000, stderr_chars: int = 6000) -> str:
    """``exit <code>`` and the last characters of the process's stdout and stderr."""
    return (f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-stdout_chars:]}\n"
            f"--- stderr ---\n{proc.stderr[-stderr_chars:]}")


def read_steps(run_dir: Path) -> list[dict]:
    """A run's per-step scalars: ``<run_dir>/steps.jsonl``, one JSON object per step, in step order."""
    return [json.loads(x) for x in (Path(run_dir) / "steps.jsonl").read_text().splitlines() if x.strip()]


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar under ``tb_dir`` (a run's ``tb/``): ``{tag: [(step, value), ...]}``, all events kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def hf_logprobs(model: Union["torch.nn.Module", Path, str], seq: list[int], start: int,
                temperature: float = 1.0) -> list[float]:
    """transformers fp32 ``log softmax(logits / temperature)[p - 1, seq[p]]`` for ``p`` in ``[start, len(seq))``.

    ``model``: a loaded causal LM (eval mode) or the directory of an HF checkpoint (loaded in fp32 for this call).
    """
    if isinstance(model, (str, Path)):
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    lp = torch.log_softmax(logits / temperature, dim=-1)
    return [float(lp[p - 1, seq[p]]) for p in range(start, len(seq))]
