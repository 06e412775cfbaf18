"""End to end through the real CLI on the CPU engine: ``rollout.mode=partial`` parks the groups aborted when
the dynamic sampler fills, continues them the next step, reports it under ``rollout/partial_*``, carries the surplus
groups to the next step (``algorithm.carry_over_surplus`` follows partial rollout), and carries both through a
checkpoint into a resumed run."""
from __future__ import annotations

import json

import pytest

from helpers import fail_message, read_scalars, run_train

# 2 kept groups of 8 samples, 32 prompts requested per round: the CPU engine decodes them in batches of 64
# sequences, so the sampler fills while later batches are queued or decoding, and those requests are aborted
PARTIAL = ["rollout.mode=partial", "algorithm.oversample_factor=16",
           "rollout.rollout_batch_size=2", "rollout.n_samples_per_prompt=8", "actor.ppo_mini_batch_size=16",
           "trainer.export_hf=false", "trainer.save_interval=0", "trainer.eval_interval=0"]
KEYS = ("parked", "continued", "tokens_reused", "dropped_stale", "tokens_dropped", "pending")


@pytest.mark.slow
def test_partial_rollout_three_steps_then_resume(tmp_path, tiny_model):  # noqa: F811
    # surplus groups dropped, as without partial rollout: a carried batch would leave a step nothing to continue
    # and the continued samples' off-policy prefixes are context only (slime's --mask-offpolicy-in-partial-rollout)
    base = [f"output_dir={tmp_path}", "run_name=partial", f"model.hf_path={tiny_model}",
            "algorithm.carry_over_surplus=false", "algorithm.mask_offpolicy_in_partial_rollout=true"] + PARTIAL
    proc = run_train(base + ["trainer.total_steps=3"])
    assert proc.returncode == 0, fail_message(proc)
    run = tmp_path / "partial"
    assert "\n  mode: partial\n" in (run / "config.yaml").read_text()
    sc = read_scalars(run / "tb")
    for k in [f"rollout/partial_{k}" for k in KEYS] + ["rollout/generated_tokens", "rollout/trained_tokens"]:
        assert [s for s, _ in sc[k]] == [1, 2, 3], k
    v = {k: [x for _, x in sc[f"rollout/partial_{k}"]] for k in KEYS}
    assert v["continued"][0] == 0 and v["dropped_stale"][0] == 0  # nothing parked before step 1
    for k in (1, 2):  # only what the previous step parked is continued, or reset as stale (finished samples
        assert v["continued"][k] <= v["parked"][k - 1], v  # of a parked group included, G = 8 each)
        assert v["dropped_stale"][k] <= 8 * v["pending"][k - 1], v
    # 32 prompts x 8 samples for 2 kept groups: every step aborts work in flight and parks it (measured 64-103
    # samples per step), and the next step continues it or resets it as stale
    assert all(x > 0 for x in v["parked"]), v
    assert all(v["continued"][k] + v["dropped_stale"][k] > 0 for k in (1, 2)), v
    assert all(x == 0 for _, x in sc["dynamic_sampling/surplus_carried"])  # carry_over_surplus=false: dropped
    assert all(x > 0 for _, x in sc["rollout/trained_tokens"])
    # the loss holds every trained response token but the prefixes from older weights (no overlong filtering here)
    trained, prefix = ([x for _, x in sc[f"rollout/{k}"]] for k in ("trained_tokens", "offpolicy_prefix_tokens"))
    assert [x for _, x in sc["actor/loss_tokens"]] == [t - p for t, p in zip(trained, prefix)], (trained, prefix)
    # the parked groups are part of the checkpoint's trainer state
    state = json.loads((run / "checkpoints" / "iter_0000003" / "trainer_state.json").read_text())
    pending = state["sampler"]["pending"]
    assert len(pending) == v["pending"][2] and all(len(g["responses"]) == 8 for g in pending)
    prefixes = sum(1 for g in pending for r, f in zip(g["responses"], g["finish_reasons"]) if f == "abort" and r)
    with_tokens = sum(1 for g in pending for r in g["responses"] if r)
    # weight version = optimizer steps done when the tokens were generated: 0, 1 or 2 in steps 1-3
    assert {span[2] for g in pending for spans in g["token_versions"] for span in spans} <= {0, 1, 2}
    # a resumed run continues them at step 4
    proc = run_train(base + ["trainer.total_steps=4"])
    assert proc.returncode == 0, fail_message(proc)
    last = json.loads((run / "steps.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4
    # every parked prefix is continued, or reset (with any other sample of its group holding a token 2 versions
    # old, max age 1) to be generated again; the group itself is never dropped
    handled = last["rollout/partial_continued"] + last["rollout/partial_dropped_stale"]
    print(f"partial rollout per step: {v}; off-policy prefix tokens masked {prefix}; parked prefixes at the "
          f"checkpoint: {prefixes}; step 4 handled {handled}")
    assert prefixes > 0 and 0 < handled <= with_tokens, (last, prefixes, with_tokens)


@pytest.mark.slow
def test_partial_rollout_carries_surplus_groups_through_resume(tmp_path, tiny_model):  # noqa: F811
    """The default with partial rollout: surplus groups are carried (trained the next step, or parked again when a
    token is older than ``partial_max_age``), their ages are logged, and the carry is part of the checkpoint."""
    base = [f"output_dir={tmp_path}", "run_name=carry", f"model.hf_path={tiny_model}"] + PARTIAL
    proc = run_train(base + ["trainer.total_steps=3"])
    assert proc.returncode == 0, fail_message(proc)
    run = tmp_path / "carry"
    sc = read_scalars(run / "tb")
    ds = {k: [x for _, x in sc[f"dynamic_sampling/{k}"]] for k in ("surplus_carried", "carried_in", "carried_stale")}
    ages = [x for _, x in sc["rollout/token_age_max"]]
    print(f"carry per step: {ds}; token_age_max {ages}")
    assert ds["carried_in"][0] == 0 and ds["carried_stale"][0] == 0
    for k in (1, 2):  # every carried group comes in the next step: trained, or parked again when too old
        assert ds["carried_in"][k] + ds["carried_stale"][k] == ds["surplus_carried"][k - 1], ds
    # synchronous, partial_max_age=1: fresh tokens are 0 versions old, carried or continued ones 1, never more
    assert ages[0] == 0 and all(0 <= a <= 1 for a in ages), ages
    # without algorithm.mask_offpolicy_in_partial_rollout every trained response token enters the loss
    assert [x for _, x in sc["actor/loss_tokens"]] == [x for _, x in sc["rollout/trained_tokens"]]
    state = json.loads((run / "checkpoints" / "iter_0000003" / "trainer_state.json").read_text())
    carry = state["sampler"]["carry"]
    assert len(carry) == ds["surplus_carried"][2] and all(len(g["responses"]) == 8 for g in carry)
    assert {span[2] for g in carry for spans in g["token_versions"] for span in spans} <= {0, 1, 2}
    proc = run_train(base + ["trainer.total_steps=4"])  # resumed from iter_0000003: the carry comes in at step 4
    assert proc.returncode == 0, fail_message(proc)
    last = json.loads((run / "steps.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4
    assert last["dynamic_sampling/carried_in"] + last["dynamic_sampling/carried_stale"] == len(carry), last
    assert 0 <= last["rollout/token_age_max"] <= 1, last


@pytest.mark.slow
def test_partial_rollout_with_one_step_off_policy_and_resume(tmp_path, tiny_model):  # noqa: F811
    """Both overlaps at once: the background batch is generated by weights one step old and may contain continued
    prefixes and carried groups one more version old (``rollout/token_age_max`` <= 1 + partial_max_age); the
    checkpoint holds the batch in flight and the parked and carried groups, and the resumed run trains on exactly
    the stored batch."""
    base = [f"output_dir={tmp_path}", "run_name=both", f"model.hf_path={tiny_model}", "rollout.colocated=false",
            "rollout.max_staleness=1", "algorithm.tis_cap=2.0"] + PARTIAL
    proc = run_train(base + ["trainer.total_steps=3"])
    assert proc.returncode == 0, fail_message(proc)
    run = tmp_path / "both"
    steps = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
    assert [s["rollout/staleness"] for s in steps] == [0.0, 1.0, 1.0]
    ages = [s["rollout/token_age_max"] for s in steps]
    print(f"token_age_max {ages}; parked {[s['rollout/partial_parked'] for s in steps]}; continued "
          f"{[s['rollout/partial_continued'] for s in steps]}; carried in "
          f"{[s['dynamic_sampling/carried_in'] for s in steps]}")
    assert ages[0] == 0 and all(1 <= a <= 2 for a in ages[1:]), ages  # fresh tokens of steps 2-3 are 1 old
    assert sum(s["rollout/partial_parked"] for s in steps) > 0
    state = json.loads((run / "checkpoints" / "iter_0000003" / "trainer_state.json").read_text())
    stored = [g["prompt_index"] for g in state["prefetch"]["groups"]]
    assert state["prefetch"]["weight_version"] == 2 and len(stored) == 2
    assert {span[2] for g in state["sampler"]["pending"] + state["sampler"]["carry"]
            for spans in g["token_versions"] for span in spans} <= {1, 2}  # older ones were reset or trained
    proc = run_train(base + ["trainer.total_steps=4"])
    assert proc.returncode == 0, fail_message(proc)
    last = json.loads((run / "steps.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["rollout/staleness"] == 1.0 and last["rollout/weight_version"] == 2.0
    assert last["prompt_indices"] == stored, (last["prompt_indices"], stored)
