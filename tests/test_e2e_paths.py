"""End to end through the real CLI, on the paths the cluster examples use and the tiny demo does not:

* the default rollout path (``rollout.mode=streaming``: one request per prompt, concurrent,
  abort when the dynamic sampler is full) with overlong filtering, for 3 steps;
* each algorithm preset: ``dapo`` (above) and ``grpo``. The recipe runs no reference model, so the
  ``grpo`` preset has its KL term off and trains as is; ``algorithm.kl_loss=true`` is refused by the
  config validation, before anything is built: exit 2 and one line naming the key (no traceback).
* the engine lifecycle (issue 12): evaluation at the step of a save, and the engines after an HF export mid-run,
  a save and a preemption save, colocated and not.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import CONFIG, fail_message, read_scalars, repo_env, run_train, shared_tiny_model
from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The demo model, prepared once for the session's end-to-end modules (helpers.shared_tiny_model)."""
    return shared_tiny_model(tmp_path_factory)


SMALL = ["rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=4", "actor.ppo_mini_batch_size=16",
         "trainer.export_hf=false", "trainer.save_interval=0", "trainer.eval_interval=0"]


def _base(tmp, model, name, steps):
    return [f"output_dir={tmp}", f"run_name={name}", f"model.hf_path={model}",
            f"trainer.total_steps={steps}"] + SMALL


# Two trainer runs shared by the tests below (each test asserts its own properties of a run's outputs). Both save and
# evaluate after every step (small evaluations: the tests only need avg@k to come back), so they also serve
# test_eval_at_the_step_of_a_save: the streaming run with colocated engines, the grpo run with separate ones.
SAVE_EVAL_EVERY_STEP = ["trainer.save_interval=1", "trainer.eval_interval=1", "trainer.keep_last_checkpoints=3",
                        "trainer.eval_max_prompts=4", "trainer.eval_n_samples=2"]


def _every_step(args):
    return [a for a in args if not a.startswith(("trainer.save_interval", "trainer.eval_interval"))] + \
        SAVE_EVAL_EVERY_STEP


@pytest.fixture(scope="module")
def streaming_run(tmp_path_factory, tiny_model):  # noqa: F811
    """3 steps on the default rollout path with overlong filtering (dapo), colocated engines; (run dir, process)."""
    tmp = tmp_path_factory.mktemp("streaming")
    proc = run_train(_every_step(_base(tmp, tiny_model, "nd", 3)) + [
        "rollout.mode=streaming", "algorithm.overlong_filtering=true", "algorithm.preset=dapo",
        "rollout.colocated=true"])
    return tmp / "nd", proc


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_model):  # noqa: F811
    """2 steps with the grpo preset, engines not colocated; (run dir, process)."""
    tmp = tmp_path_factory.mktemp("grpo")
    proc = run_train(_every_step(_base(tmp, tiny_model, "grpo", 2)) + ["algorithm.preset=grpo",
                                                                         "rollout.colocated=false"])
    return tmp / "grpo", proc


@pytest.mark.slow
def test_default_rollout_path_with_overlong_filtering_trains_3_steps(streaming_run):
    run, proc = streaming_run
    assert proc.returncode == 0, fail_message(proc)
    cfg_text = (run / "config.yaml").read_text()
    assert "\n  mode: streaming\n" in cfg_text and "overlong_filtering: true" in cfg_text
    steps = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert len(s["prompt_indices"]) == 4 and len(set(s["prompt_indices"])) == 4
    sc = read_scalars(run / "tb")
    kept = [v for _, v in sc["dynamic_sampling/kept_groups"]]
    tried = [v for _, v in sc["dynamic_sampling/prompts_tried"]]
    gen = [v for _, v in sc["dynamic_sampling/generated_response_tokens"]]
    batch = [v for _, v in sc["dynamic_sampling/batch_response_tokens"]]
    assert len(kept) == 3 and all(k >= 4 for k in kept) and all(t >= k for t, k in zip(tried, kept))
    # every generated token is accounted for: the batch's, filtered groups', surplus and aborted ones
    assert all(g >= b > 0 for g, b in zip(gen, batch))
    assert [s for s, _ in sc["actor/pg_loss"]] == [1, 2, 3]
    # the engine answered aborts (if any) without breaking the run; the counter is reported each step
    assert len(sc["dynamic_sampling/aborted_requests"]) == 3


@pytest.mark.slow
def test_kl_loss_is_refused_before_anything_is_built(tmp_path, tiny_model):  # noqa: F811
    proc = run_train(_base(tmp_path, tiny_model, "grpo_kl", 1) + ["algorithm.preset=grpo", "algorithm.kl_loss=true"])
    assert proc.returncode == 2, fail_message(proc)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, fail_message(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "algorithm.kl_loss" in lines[0] and "reference model" in lines[0], fail_message(proc)
    assert not (tmp_path / "grpo_kl").exists()  # refused by validate(): no run directory, actor or engine


@pytest.mark.slow
def test_grpo_preset_trains(grpo_run):
    run, proc = grpo_run
    assert proc.returncode == 0, fail_message(proc)
    steps = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    sc = read_scalars(run / "tb")
    # grpo: no dynamic-sampling filter, so every tried prompt is kept and one round fills the batch (every step)
    assert [v for _, v in sc["dynamic_sampling/num_gen_batches"]] == [1.0, 1.0]
    assert [v for _, v in sc["dynamic_sampling/kept_groups"]] == [4.0, 4.0]
    assert [v for _, v in sc["actor/num_updates"]] == [1.0, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("colocated", ["true", "false"])
def test_eval_at_the_step_of_a_save(request, colocated):
    """Every GPU example saves and evaluates at the same step; with colocated engines the save puts them to
    sleep, and evaluation must wake them (it used to die with an EngineError from the sleeping engine).
    Colocated: the streaming run (3 steps); not colocated: the grpo run (2 steps); both save and evaluate after
    every step."""
    run, proc = request.getfixturevalue("streaming_run" if colocated == "true" else "grpo_run")
    n = 3 if colocated == "true" else 2
    assert proc.returncode == 0, fail_message(proc)
    assert f"\n  colocated: {colocated}\n" in (run / "config.yaml").read_text()
    sc = read_scalars(run / "tb")
    evals = [k for k in sc if k.startswith("val/") and "avg@" in k]
    assert evals and all([s for s, _ in sc[k]] == list(range(1, n + 1)) for k in evals), sorted(sc)
    assert (run / "checkpoints" / "iter_0000001").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("colocated", ["true", "false"])
def test_engines_usable_after_export_save_and_preemption_save(tmp_path, tiny_model, colocated):  # noqa: F811
    """An HF export mid-run, a save, and the save of a preemption each hand the engines' memory back to the
    actor (colocated); evaluation and the next step right after each must still generate."""
    worker = REPO_ROOT / "tests" / "dist_scripts" / "lifecycle_worker.py"
    args = _base(tmp_path, tiny_model, "lifecycle", 5) + [
        f"rollout.colocated={colocated}", "trainer.eval_max_prompts=4", "trainer.eval_n_samples=2"]
    proc = subprocess.run([sys.executable, str(worker), CONFIG] + args, cwd=REPO_ROOT, env=repo_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, fail_message(proc)
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    for phase in ("eval_after_export", "eval_after_save", "eval_after_preemption_save"):
        assert res[phase], (phase, res)  # avg@k metrics came back: the engines generated
    assert res["fit_exit_code"] == 3 and res["step_after_preemption"] and res["step"] == 4, res
    assert res["engines"] == ["generating", "4"], res
    run = tmp_path / "lifecycle"
    assert (run / "hf_mid_run" / "model.safetensors").exists()
    assert (run / "checkpoints" / "iter_0000002").is_dir() and (run / "checkpoints" / "iter_0000003").is_dir()
