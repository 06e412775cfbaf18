"""Rollout/training overlap on CPU (issue 14): one-step off-policy vs synchronous step time, and partial rollout
vs dropping aborted requests, in one run.

Run: ``.venv/bin/python benchmarks/bench_overlap.py [--steps N] [--partial-steps M]`` from the repo root.

X: trains a fixed tiny random Qwen2 (hidden 64, 2 layers, the demo tokenizer) through the real CLI with
disaggregated engines (``rollout.colocated=false``, one CPU engine process on one thread, the trainer on one
thread) for N steps, once with ``rollout.max_staleness=0`` and once with ``=1``, and divides the mean
``timing/step_s`` of steps 2..N (step 1 of the off-policy run generates synchronously; start-up is not counted).
Sizes are chosen so that a step's rollout (32 prompts x G 4, up to 48 tokens) and its training (``old_logprob`` +
2 Adam updates of 64 responses) take comparable time on one core each: one-step off-policy then hides the
shorter behind the longer (ideal ratio max(r, t) / (r + t), 0.5 when equal). Dynamic sampling is off here so
that both runs generate the same amount per step.

Y: :func:`bench_partial_rollout.measure` (dynamic sampling on, partial rollout on vs off, M steps each; with
partial rollout the aborted samples are continued and the surplus groups carried to the next step).

Last line::

    bench_overlap: async/sync step time X.XX; generated per trained token partial/drop Y.YY

(goals X <= 0.75, Y <= 0.8). The figures are wall-clock ratios: run on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_partial_rollout  # noqa: E402
from benchmarks._cli_run import mean_of, prepare_model, train  # noqa: E402

#: The fixed run of X: disaggregated CPU engine, no dynamic sampling (both modes generate the same per step).
OVERLAP = ["rollout.colocated=false", "rollout.mode=streaming", "rollout.rollout_batch_size=32",
           "rollout.n_samples_per_prompt=4", "rollout.max_response_length=48", "algorithm.overlong_buffer_length=8",
           "actor.ppo_mini_batch_size=64", "algorithm.tis_cap=2.0", "algorithm.dynamic_sampling=false"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="steps of each overlap run (X)")
    ap.add_argument("--partial-steps", type=int, default=8, help="steps of each partial-rollout run (Y)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        model = prepare_model(out / "tiny-qwen2")
        step_s = {}
        for mode, staleness in (("sync", 0), ("async", 1)):
            r = train(out, mode, model, args.steps, OVERLAP + [f"rollout.max_staleness={staleness}"])
            step_s[mode] = mean_of(r, "timing/step_s")
            print(f"{mode:5s}: step {step_s[mode]:6.2f}s  rollout {mean_of(r, 'timing/rollout_s'):6.2f}s  "
                  f"old_logprob {mean_of(r, 'timing/old_logprob_s'):5.2f}s  train {mean_of(r, 'timing/train_s'):6.2f}s"
                  f"  weight sync {mean_of(r, 'timing/weight_sync_s'):5.2f}s  staleness "
                  f"{[int(s['rollout/staleness']) for s in r]}  (mean of steps 2..{args.steps})", flush=True)
        x = step_s["async"] / step_s["sync"]
        y = bench_partial_rollout.measure(out, model, args.partial_steps, log=lambda line: print(line, flush=True))
    print(f"(wall {time.perf_counter() - t_start:.0f}s)")
    print(f"bench_overlap: async/sync step time {x:.2f}; generated per trained token partial/drop {y:.2f}")


if __name__ == "__main__":
    main()
