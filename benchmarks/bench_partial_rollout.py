"""Partial rollout vs dropping aborted requests: response tokens generated per response token trained.

Run: ``.venv/bin/python benchmarks/bench_partial_rollout.py [--steps N]`` (CPU, a few minutes).

Trains the demo task (tiny random Qwen2, ``examples/tiny-cpu/dapo.yaml``) twice through the real CLI, with the
default (streaming, aborting) rollout path and dynamic sampling, identical except for
``rollout.partial_rollout``: 2 kept groups of G=8 per step, ``oversample_factor=8`` (16 prompts in flight), two
CPU engines (their decode batches are out of step, so the sampler usually fills while the other engine is
half-way through a batch and many requests are aborted with long prefixes). Each run's figure is
:func:`~megatron_dapo.rollout.generation.generated_per_trained_token` over its ``steps.jsonl``; the last line is

    generated per trained token partial/drop Y.YY

(goal of issue 14: Y <= 0.8). Rollouts are not deterministic (completion order decides what is aborted), so
the figure varies from run to run; more ``--steps`` average it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_dapo.rollout.generation import generated_per_trained_token  # noqa: E402

CONFIG = REPO / "examples" / "tiny-cpu" / "dapo.yaml"
SETTINGS = ["rollout.deterministic=false", "rollout.num_engines=2", "algorithm.oversample_factor=8",
            "rollout.rollout_batch_size=2", "rollout.n_samples_per_prompt=8", "rollout.max_response_length=48",
            "algorithm.overlong_buffer_length=16", "actor.ppo_mini_batch_size=16", "trainer.export_hf=false",
            "trainer.save_interval=0", "trainer.eval_interval=0", "resume=none"]


def read_steps(run_dir: Path) -> list[dict]:
    """The step scalars of a run (``<run_dir>/steps.jsonl``, one JSON object per step)."""
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines() if line.strip()]


def train(out: Path, model: Path, name: str, steps: int, partial: bool) -> list[dict]:
    """One CLI training run; returns its step scalars. Raises RuntimeError (with the log tail) on failure."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "megatron_dapo.train", str(CONFIG), f"output_dir={out}", f"run_name={name}",
           f"model.hf_path={model}", f"trainer.total_steps={steps}",
           f"rollout.partial_rollout={'true' if partial else 'false'}"] + SETTINGS
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return read_steps(out / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out, model = Path(d), Path(d) / "model"
        figures = {}
        for name, partial in (("partial", True), ("drop", False)):
            steps = train(out, model, name, args.steps, partial)
            figures[name] = generated_per_trained_token(steps)
            gen = sum(s["rollout/generated_tokens"] for s in steps)
            trained = sum(s["rollout/trained_tokens"] for s in steps)
            extra = ""
            if partial:
                extra = (f"; continued {sum(s['rollout/partial_continued'] for s in steps):.0f} samples, "
                         f"reused {sum(s['rollout/partial_tokens_reused'] for s in steps):.0f} tokens, dropped stale "
                         f"{sum(s['rollout/partial_tokens_dropped'] for s in steps):.0f} tokens")
            print(f"{name:8s}: {args.steps} steps, generated {gen:.0f} / trained {trained:.0f} response tokens = "
                  f"{figures[name]:.2f} per trained token{extra}", flush=True)
    print(f"generated per trained token partial/drop {figures['partial'] / figures['drop']:.2f}")


if __name__ == "__main__":
    main()
