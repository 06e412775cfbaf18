"""Rollout/training overlap on CPU (issue 14): synchronous vs one-step off-policy step time, in one run.

Run: ``.venv/bin/python benchmarks/bench_overlap.py [--steps N]`` from the repo root. It trains a fixed tiny
random Qwen2 (hidden 64, 2 layers, the demo tokenizer) through the real CLI with disaggregated engines
(``rollout.colocated=false``, one CPU engine process on one thread, the trainer on one thread) for N steps,
once with ``rollout.max_staleness=0`` and once with ``=1``, and compares the mean ``timing/step_s`` of steps
2..N (step 1 of the off-policy run generates synchronously; start-up is not counted).

Sizes are chosen so that a step's rollout (32 prompts x G 4, up to 32 tokens) and its training
(``old_logprob`` + 4 Adam updates of 32 responses) take comparable time on one core each: one-step off-policy
then hides the shorter of the two behind the longer (ideal ratio max(r, t) / (r + t) = 0.5 when equal).
Dynamic sampling is off here so that both runs generate the same amount per step.

Last line::

    bench_overlap: async/sync step time X.XX; generated per trained token partial/drop Y.YY

(goals X <= 0.75, Y <= 0.8). Y is measured by :func:`generated_per_trained_token_partial_vs_drop`, which
needs the partial-rollout feature; without it Y prints ``n/a``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_dapo.config import RolloutConfig  # noqa: E402

CONFIG = REPO / "examples" / "tiny-cpu" / "dapo.yaml"

#: The fixed run: tiny model, disaggregated CPU engine, no evaluation / checkpoints / export in the timing.
COMMON = ["rollout.colocated=false", "rollout.deterministic=false", "rollout.rollout_batch_size=32",
          "rollout.n_samples_per_prompt=4", "rollout.max_response_length=32", "algorithm.overlong_buffer_length=8",
          "actor.ppo_mini_batch_size=32", "algorithm.tis_cap=2.0", "trainer.eval_interval=0",
          "trainer.save_interval=0", "trainer.export_hf=false", "resume=none"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"  # the trainer on one core; the CPU engine runs on one thread of its own
    return env


def train(out: Path, name: str, model: Path, steps: int, extra: list[str]) -> list[dict]:
    """Run ``megatron_dapo.train`` for ``steps`` steps; returns its ``steps.jsonl`` records.

    Raises:
        RuntimeError: the run failed (its output tail is in the message).
    """
    cmd = [sys.executable, "-m", "megatron_dapo.train", str(CONFIG), f"output_dir={out}", f"run_name={name}",
           f"model.hf_path={model}", f"trainer.total_steps={steps}"] + COMMON + extra
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(x) for x in (out / name / "steps.jsonl").read_text().splitlines()]


def mean_step_s(steps: list[dict]) -> float:
    """Mean ``timing/step_s`` (seconds) of steps 2..N."""
    xs = [s["timing/step_s"] for s in steps[1:]]
    return sum(xs) / len(xs)


def mean_of(steps: list[dict], key: str) -> float:
    xs = [s[key] for s in steps[1:] if key in s]
    return sum(xs) / len(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------------- partial rollout
# Y belongs to the partial-rollout change (rollout/generation.py, algorithm/dynamic_sampling.py): it is measured
# only when ``rollout.partial_rollout`` exists, from two per-step metrics that change must log:
#   rollout/generated_tokens  tokens the engines generated in the step (every round, aborted requests included)
#   rollout/trained_tokens    response tokens of the batch the actor trained on


def generated_per_trained_token_partial_vs_drop(out: Path, model: Path, steps: int) -> Optional[float]:
    """Y: (generated / trained tokens with partial rollout) / (the same when aborted requests are dropped),
    both with dynamic sampling on, summed over steps 2..N. ``None`` when this checkout has no
    ``rollout.partial_rollout`` (or the runs do not log the two token counts)."""
    if "partial_rollout" not in {f.name for f in dataclasses.fields(RolloutConfig)}:
        return None
    ratios = []
    for partial in ("false", "true"):
        recs = train(out, f"ds-partial-{partial}", model, steps,
                     ["algorithm.dynamic_sampling=true", f"rollout.partial_rollout={partial}"])[1:]
        if not all("rollout/generated_tokens" in s and "rollout/trained_tokens" in s for s in recs):
            return None
        ratios.append(sum(s["rollout/generated_tokens"] for s in recs) / sum(s["rollout/trained_tokens"] for s in recs))
    return ratios[1] / ratios[0]


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        model = out / "tiny-qwen2"
        subprocess.run([sys.executable, "-m", "megatron_dapo.cli", "prepare", str(CONFIG), f"model.hf_path={model}"],
                       cwd=REPO, env=_env(), check=True, capture_output=True)
        runs = {}
        for mode, staleness in (("sync", 0), ("async", 1)):
            runs[mode] = train(out, mode, model, args.steps,
                               [f"rollout.max_staleness={staleness}", "algorithm.dynamic_sampling=false"])
            r = runs[mode]
            print(f"{mode:5s}: step {mean_step_s(r):6.2f}s  rollout {mean_of(r, 'timing/rollout_s'):6.2f}s  "
                  f"old_logprob {mean_of(r, 'timing/old_logprob_s'):5.2f}s  train {mean_of(r, 'timing/train_s'):6.2f}s  "
                  f"weight sync {mean_of(r, 'timing/weight_sync_s'):5.2f}s  staleness "
                  f"{[int(s['rollout/staleness']) for s in r]}  (mean of steps 2..{args.steps})", flush=True)
        x = mean_step_s(runs["async"]) / mean_step_s(runs["sync"])
        y = generated_per_trained_token_partial_vs_drop(out, model, args.steps)
    print(f"(wall {time.perf_counter() - t_start:.0f}s)")
    y_text = "n/a" if y is None else f"{y:.2f}"
    print(f"bench_overlap: async/sync step time {x:.2f}; generated per trained token partial/drop {y_text}")


if __name__ == "__main__":
    main()
