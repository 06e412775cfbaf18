"""Shared by the CLI-driven benchmarks (``bench_overlap.py``, ``bench_partial_rollout.py``): run the real
training CLI on the demo recipe (``examples/tiny-cpu/dapo.yaml``) and read back its per-step scalars.

Not a benchmark itself (the leading underscore keeps it out of ``benchmarks/bench_*``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "tiny-cpu" / "dapo.yaml"

#: No evaluation, checkpoints or export inside a timed run, and never a resume from an earlier one.
QUIET = ["trainer.eval_interval=0", "trainer.save_interval=0", "trainer.export_hf=false", "resume=none"]


def cli_env(threads: int = 1) -> dict:
    """The environment of a CLI run: this checkout first on ``PYTHONPATH`` and ``OMP_NUM_THREADS=threads``
    (the trainer on ``threads`` cores; each CPU engine process runs on one thread of its own)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def prepare_model(model_dir: Path) -> Path:
    """Write the demo recipe's tiny random Qwen2 (and its tokenizer) to ``model_dir`` with ``megatron_dapo.cli
    prepare``; returns ``model_dir``. Raises ``subprocess.CalledProcessError`` when it fails."""
    subprocess.run([sys.executable, "-m", "megatron_dapo.cli", "prepare", str(CONFIG), f"model.hf_path={model_dir}"],
                   cwd=REPO, env=cli_env(), check=True, capture_output=True)
    return model_dir


def read_steps(run_dir: Path) -> list[dict]:
    """The step scalars of a run (``<run_dir>/steps.jsonl``, one JSON object per step, in step order)."""
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines() if line.strip()]


def train(out: Path, name: str, model: Path, steps: int, overrides: list[str]) -> list[dict]:
    """Run ``python -m megatron_dapo.train`` on the demo recipe as ``<out>/<name>`` for ``steps`` steps with
    ``overrides`` (``key=value``; :data:`QUIET` comes first, so an override wins) and return its step scalars.

    Raises:
        RuntimeError: the run exited non-zero (its exit code and output tail are in the message).
    """
    cmd = [sys.executable, "-m", "megatron_dapo.train", str(CONFIG), f"output_dir={out}", f"run_name={name}",
           f"model.hf_path={model}", f"trainer.total_steps={steps}"] + QUIET + list(overrides)
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return read_steps(out / name)


def mean_of(steps: list[dict], key: str, skip: int = 1) -> float:
    """Mean of ``key`` over ``steps[skip:]`` (the first step is start-up; NaN when no step has ``key``)."""
    xs = [s[key] for s in steps[skip:] if key in s]
    return sum(xs) / len(xs) if xs else float("nan")
