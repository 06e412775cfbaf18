"""Step metrics (issue 12): one timer helper, producers return unprefixed names and the caller scopes them,
and every scalar of a step reaches TensorBoard and ``steps.jsonl`` (no key list that drops a new metric).

The end-to-end part trains one step of the CPU demo (colocated engine, 4 prompts x 4 samples, one update) on
a copy of the demo model whose ``generation_config.json`` lists two extra eos ids, with a 3-step LR warm-up,
and checks:

* the step's TensorBoard scalar names are exactly the set recorded before this change (which already had
  ``actor/lr``) -- :data:`TB_TAGS_ONE_STEP`, recorded from commit c501a3c with the same command;
* ``steps.jsonl`` holds every TensorBoard scalar of the step, with the same values;
* ``actor/lr`` is ``actor.lr / 3`` (first step of a 3-step warm-up counted in rollout steps);
* training and ``megatron-dapo eval`` stop generation at the same ids: the tokenizer's eos plus every
  ``eos_token_id`` of ``generation_config.json`` (one rule, :func:`stop_ids_for_model`).
"""
from __future__ import annotations

import json
import math
import re
import shutil

import pytest

from megatron_dapo.metrics import scalars, scoped, timed
from megatron_dapo.rollout.generation import RoundStats, stop_ids_for, stop_ids_for_model
from helpers import CONFIG, fail_message, read_scalars, run_train

#: TensorBoard scalar names of step 1 of the run in :func:`one_step`, recorded before issue 12's changes.
TB_TAGS_ONE_STEP = frozenset({
    "actor/approx_kl", "actor/entropy", "actor/grad_norm", "actor/kl_loss", "actor/lr", "actor/nonfinite_entropy",
    "actor/icepop_masked_frac", "actor/seq_is_masked_frac",  # issue 14's mismatch corrections (0 when off)
    "actor/nonfinite_grad_norm", "actor/nonfinite_kl_loss", "actor/nonfinite_policy_loss", "actor/nonfinite_ratio",
    "actor/num_updates", "actor/old_entropy", "actor/pg_clipfrac", "actor/pg_clipfrac_dual",
    "actor/pg_clipfrac_high", "actor/pg_clipfrac_low", "actor/pg_loss", "actor/ratio_mean", "actor/update_skipped",
    "colocate/actor_offload_s", "colocate/actor_onload_s", "colocate/engine_release_s",
    "colocate/engine_resume_kv_cache_s", "colocate/engine_resume_weights_s", "colocate/sync_s",
    "data/prompts_skipped_too_long", "dynamic_sampling/aborted_requests", "dynamic_sampling/all_correct",
    "dynamic_sampling/all_wrong", "dynamic_sampling/batch_response_tokens", "dynamic_sampling/carried_in",
    "dynamic_sampling/carried_stale", "rollout/token_age_max", "rollout/token_age_mean",  # carried-group ages
    "rollout/offpolicy_prefix_tokens", "actor/loss_tokens",  # issue 22's prefix mask: prefix and loss token counts
    "rollout/engine_restarts", "rollout/engines_alive", "rollout/requests_resubmitted",  # issue 25: engine health
    "dynamic_sampling/generated_response_tokens", "dynamic_sampling/keep_rate", "dynamic_sampling/kept_groups",
    "dynamic_sampling/num_gen_batches", "dynamic_sampling/prompts_tried", "dynamic_sampling/surplus_carried",
    "dynamic_sampling/surplus_dropped", "dynamic_sampling/waste_ratio", "memory/actor_offload_bytes",
    "memory/actor_offload_ddp_buffers_bytes", "memory/actor_offload_grads_bytes",
    "memory/actor_offload_master_params_bytes", "memory/actor_offload_module_buffers_bytes",
    "memory/actor_offload_optimizer_state_bytes", "memory/actor_offload_params_bytes",
    "memory/actor_offload_tensors", "memory/actor_onload_bytes", "memory/actor_onload_tensors", "rollout/acc",
    "rollout/acc/arith_demo", "rollout/generated_per_trained_token", "rollout/generated_tokens",
    "rollout/trained_tokens", "rollout/staleness", "rollout/weight_version", "rollout/malformed/finish_reason", "rollout/malformed/length",
    "rollout/malformed/logprob_count", "rollout/malformed/logprob_nonfinite", "rollout/malformed/logprob_positive",
    "rollout/malformed/token_id", "rollout/malformed_groups_dropped", "rollout/malformed_responses",
    "rollout/mean_token_prob", "rollout/no_answer_frac", "rollout/num_responses",
    "rollout/response_length_clip_ratio", "rollout/response_length_max", "rollout/response_length_mean",
    "rollout/reward_mean", "rollout/score_mean", "rollout/train_rollout_logprob_abs_diff",
    "rollout/train_rollout_logprob_abs_diff_max", "timing/actor_offload_s", "timing/actor_onload_s",
    "timing/old_logprob_s", "timing/reward_s", "timing/rollout_s", "timing/step_s", "timing/train_s",
    "timing/weight_sync_s", "weight_sync/bytes", "weight_sync/export_s", "weight_sync/num_buckets",
    "weight_sync/pause_s", "weight_sync/seconds", "weight_sync/transfer_s",
})

EXTRA_EOS = (17, 23)
TINY_CPU_LR = 2.0e-3  # actor.lr of examples/tiny-cpu/dapo.yaml


# ------------------------------------------------------------------------------------------------ units
def test_timed_writes_seconds_only_when_the_body_completes():
    m: dict[str, float] = {}
    with timed(m, "rollout"):
        sum(range(1000))
    assert list(m) == ["timing/rollout_s"] and 0.0 <= m["timing/rollout_s"] < 5.0
    with pytest.raises(KeyError):
        with timed(m, "train"):
            raise KeyError("boom")
    assert "timing/train_s" not in m


def test_scoped_prefixes_and_refuses_double_prefixes():
    assert scoped("dynamic_sampling", {"kept_groups": 3, "keep_rate": 0.5}) == {
        "dynamic_sampling/kept_groups": 3.0, "dynamic_sampling/keep_rate": 0.5}
    with pytest.raises(ValueError, match="already under 'rollout'"):
        scoped("rollout", {"rollout/acc": 1.0})
    with pytest.raises(ValueError, match="trailing"):
        scoped("rollout/", {"acc": 1.0})


def test_scalars_keeps_numbers_including_nan_and_inf():
    import numpy as np

    got = scalars({"a": 1, "b": 2.5, "c": float("nan"), "d": math.inf, "e": np.float32(0.25), "f": True,
                   "s": "text", "l": [1.0]})
    assert list(got) == ["a", "b", "c", "d", "e", "f"] and math.isnan(got["c"]) and got["e"] == 0.25


def test_round_stats_metrics_are_unprefixed():
    from megatron_dapo.algorithm import Group

    st = RoundStats()
    g = Group(prompt_index=0, prompt_ids=[1], responses=[[2, 3], [4]], rewards=[1.0, -1.0], correct=[True, False],
              finish_reasons=["stop", "length"], rollout_logprobs=[[-0.1, -0.2], [-0.3]])
    st.add(g, [1.0, -1.0], ["ok", "no_answer"], "demo")
    m = st.metrics()
    assert not any("/" in k and not k.startswith("acc/") for k in m), m
    assert m["acc"] == 0.5 and m["acc/demo"] == 0.5 and m["response_length_clip_ratio"] == 0.5
    assert set(scoped("rollout", m)) >= {"rollout/reward_mean", "rollout/acc/demo", "rollout/mean_token_prob"}


def test_stop_ids_for_model_reads_generation_config(tmp_path):
    class Tok:
        eos_token_id = 2

    assert stop_ids_for_model(Tok(), tmp_path) == [2]  # no generation_config.json: the tokenizer's eos
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2, 23, 17]}))
    assert stop_ids_for_model(Tok(), tmp_path) == [0, 2, 17, 23]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert stop_ids_for_model(Tok(), tmp_path) == stop_ids_for(Tok(), {"eos_token_id": 5}) == [2, 5]


# ------------------------------------------------------------------------------------------------ one step
@pytest.fixture(scope="module")
def model_with_extra_eos(tiny_model, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("eos") / "tiny-qwen2-eos"
    shutil.copytree(tiny_model, d)
    gen = json.loads((d / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    gen["eos_token_id"] = eos + list(EXTRA_EOS)
    (d / "generation_config.json").write_text(json.dumps(gen))
    return d


@pytest.fixture(scope="module")
def one_step(model_with_extra_eos, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_step")
    proc = run_train([f"output_dir={out}", "run_name=s1", f"model.hf_path={model_with_extra_eos}",
                      "trainer.total_steps=1", "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=4",
                      "actor.ppo_mini_batch_size=16", "trainer.export_hf=false", "trainer.save_interval=0",
                      "trainer.eval_interval=0", "actor.lr_warmup_steps=3"])
    assert proc.returncode == 0, fail_message(proc)
    return out / "s1", proc


@pytest.mark.slow
def test_tensorboard_scalar_names_unchanged(one_step):
    run, _ = one_step
    tags = set(read_scalars(run / "tb"))
    assert tags == TB_TAGS_ONE_STEP, f"new: {sorted(tags - TB_TAGS_ONE_STEP)}; gone: {sorted(TB_TAGS_ONE_STEP - tags)}"


@pytest.mark.slow
def test_steps_jsonl_has_every_scalar_of_the_step(one_step):
    run, _ = one_step
    sc = read_scalars(run / "tb")
    (line,) = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
    assert line["step"] == 1 and len(line["prompt_indices"]) == 4
    assert set(line) - {"step", "prompt_indices"} == set(sc)
    for k, [(step, v)] in sc.items():
        assert step == 1
        assert line[k] == pytest.approx(v, rel=1e-6, abs=1e-12) or (math.isnan(v) and math.isnan(line[k])), k


@pytest.mark.slow
def test_lr_of_the_first_rollout_step_of_a_3_step_warmup(one_step):
    run, _ = one_step
    [(step, lr)] = read_scalars(run / "tb")["actor/lr"]
    assert step == 1 and lr == pytest.approx(TINY_CPU_LR / 3, rel=1e-6)


@pytest.mark.slow
def test_training_and_eval_stop_at_the_same_ids(one_step, model_with_extra_eos, monkeypatch, tmp_path):
    import megatron_dapo.evaluation as ev
    from megatron_dapo.data import load_tokenizer

    _, proc = one_step
    found = re.findall(r"stop token ids: \[([0-9, ]*)\]", proc.stderr + proc.stdout)
    assert len(found) == 1, fail_message(proc)
    train_ids = [int(x) for x in found[0].split(",")]

    seen = {}

    class Stop(Exception):
        pass

    def fake_evaluate(client, tokenizer, rows, **kw):
        seen["stop_token_ids"] = list(kw["stop_token_ids"])
        raise Stop

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    with pytest.raises(Stop):
        ev.eval_main([CONFIG, f"model.hf_path={model_with_extra_eos}", f"output_dir={tmp_path}",
                      "--engine-url", "http://127.0.0.1:9", "--quiet", "--no-tensorboard"])
    tok = load_tokenizer(model_with_extra_eos)
    gen = json.loads((model_with_extra_eos / "generation_config.json").read_text())
    want = sorted({tok.eos_token_id, *gen["eos_token_id"]})
    assert set(EXTRA_EOS) <= set(want)
    assert train_ids == seen["stop_token_ids"] == want
