"""Partial rollout vs dropping aborted requests: response tokens generated per response token trained.

Run: ``.venv/bin/python benchmarks/bench_partial_rollout.py [--steps N] [--ablation]`` (CPU, a few minutes).

Trains the demo task (tiny random Qwen2, ``examples/tiny-cpu/dapo.yaml``) twice through the real CLI, with the
default (streaming, aborting) rollout path and dynamic sampling, identical except for
``rollout.mode=partial``: 2 kept groups of G=8 per step, ``oversample_factor=8`` (16 prompts in flight), two
CPU engines (their decode batches are out of step, so the sampler usually fills while the other engine is
half-way through a batch and many requests are aborted with long prefixes). With partial rollout the aborted
samples are continued next step and the surplus groups (finished after the batch filled) are carried to it
(``algorithm.carry_over_surplus`` follows ``rollout.mode=partial``); without it both are dropped. Each run's
figure is :func:`~megatron_dapo.rollout.generation.generated_per_trained_token` over its ``steps.jsonl``;
``--ablation`` adds a third run, partial rollout without the carry, to show what each part recovers. The last
line is

    generated per trained token partial/drop Y.YY

(goal of issue 14: Y <= 0.8). ``bench_overlap.py`` measures the same Y with :func:`measure`. Rollouts are not
deterministic (completion order decides what is aborted), so the figure varies from run to run; more ``--steps``
average it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cli_run import prepare_model, train  # noqa: E402
from megatron_dapo.rollout.generation import generated_per_trained_token  # noqa: E402

SETTINGS = ["rollout.num_engines=2", "algorithm.oversample_factor=8",
            "rollout.rollout_batch_size=2", "rollout.n_samples_per_prompt=8", "algorithm.overlong_buffer_length=16",
            "actor.ppo_mini_batch_size=16"]
MAX_RESPONSE_LENGTH = 48


#: name -> overrides of the runs :func:`measure` can train ("partial" and "drop" always; "prefixes only" on request).
RUNS = {"partial": ["rollout.mode=partial"],
        "drop": ["rollout.mode=streaming"],
        "prefixes only": ["rollout.mode=partial", "algorithm.carry_over_surplus=false"]}


def measure(out: Path, model: Path, steps: int, log=print, max_response_length: int = MAX_RESPONSE_LENGTH,
            ablation: bool = False) -> float:
    """Train the two runs (``<out>/partial``, ``<out>/drop``; with ``ablation`` also partial rollout without the
    surplus carry) for ``steps`` steps each with responses of up to ``max_response_length`` tokens, ``log`` one
    line per run, and return Y = partial's generated-per-trained-token figure / drop's (dimensionless; lower is
    better).

    Raises:
        RuntimeError: a run failed; ValueError: a run logged no trained tokens.
    """
    figures = {}
    for name, overrides in RUNS.items():
        if name == "prefixes only" and not ablation:
            continue
        recs = train(out, name.replace(" ", "_"), model, steps,
                     SETTINGS + [f"rollout.max_response_length={max_response_length}"] + overrides)
        figures[name] = generated_per_trained_token(recs)
        gen = sum(s["rollout/generated_tokens"] for s in recs)
        trained = sum(s["rollout/trained_tokens"] for s in recs)

        def total(key: str) -> float:
            return sum(s[key] for s in recs)

        extra = (f"; surplus groups dropped {total('dynamic_sampling/surplus_dropped'):.0f}, carried "
                 f"{total('dynamic_sampling/surplus_carried'):.0f} (parked again as stale "
                 f"{total('dynamic_sampling/carried_stale'):.0f})")
        if "rollout/partial_continued" in recs[0]:
            extra += (f"; continued {total('rollout/partial_continued'):.0f} samples, reused "
                      f"{total('rollout/partial_tokens_reused'):.0f} tokens, dropped stale "
                      f"{total('rollout/partial_tokens_dropped'):.0f} tokens")
        log(f"{name:13s}: {steps} steps, generated {gen:.0f} / trained {trained:.0f} response tokens = "
            f"{figures[name]:.2f} per trained token{extra}")
    if ablation:
        log(f"prefixes only/drop {figures['prefixes only'] / figures['drop']:.2f}")
    return figures["partial"] / figures["drop"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-response-length", type=int, default=MAX_RESPONSE_LENGTH)
    ap.add_argument("--ablation", action="store_true", help="also run partial rollout without the surplus carry")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        y = measure(out, prepare_model(out / "model"), args.steps, log=lambda line: print(line, flush=True),
                    max_response_length=args.max_response_length, ablation=args.ablation)
    print(f"generated per trained token partial/drop {y:.2f}")


if __name__ == "__main__":
    main()
