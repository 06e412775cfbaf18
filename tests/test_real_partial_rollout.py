"""Partial rollout end to end on REAL SGLang and REAL vLLM (on our CPU engine: ``tests/test_partial_rollout_e2e.py``).

The same run on each session engine of ``tests/engine_fixtures.py`` (``rollout.engine_urls``, the default
streaming rollout with ``rollout.mode=partial``), sized per kind so the server is overfilled and requests
are still generating when the dynamic sampler fills: the aborted requests come back with their tokens and
logprobs (the protocol suite checks the engine side: ``test_aborted_prefix_continues_with_aligned_logprobs``),
are parked, and are continued at the next step with prompt + prefix as input. Checked: samples were parked
with prefixes and continued (or reset as stale), the trained batches stay consistent with the engine's
logprobs (``rollout/train_rollout_logprob_abs_diff_max``), and the logprob check passes after every push. Run twice
per engine: without the surplus carry and with the continued prefixes masked out of the loss
(``algorithm.mask_offpolicy_in_partial_rollout``: the loss holds every trained token but those prefixes); and with
the surplus carry (``algorithm.carry_over_surplus``, the default with partial rollout).
"""
from __future__ import annotations

import pytest

from helpers import fail_message, read_steps, run_train

TOL = 1e-4
STEPS = 3
# On our CPU engine the same two runs, and more (resume, one-step off-policy), are the CPU e2e tests: this module
# runs on the real engines only (tests/engine_fixtures.py pytest_generate_tests)
CPU_ENGINE_COVERED_BY = (
    "tests/test_partial_rollout_e2e.py::test_partial_rollout_three_steps_then_resume",
    "tests/test_partial_rollout_e2e.py::test_partial_rollout_carries_surplus_groups_through_resume")
COMMON = ["rollout.colocated=false", "rollout.mode=partial",
          "weight_sync.check_logprobs=true", "trainer.eval_interval=0", "trainer.save_interval=0",
          "trainer.export_hf=false", "resume=none", "algorithm.overlong_buffer_length=16"]
# per kind: enough concurrent work that later requests wait or run while the first groups are scored
SIZES = {
    # 8 prompts x 16 samples x up to 96 tokens on a 4,096-token CPU KV cache
    "sglang": ["rollout.rollout_batch_size=1", "rollout.n_samples_per_prompt=16", "algorithm.oversample_factor=8.0",
               "actor.ppo_mini_batch_size=16", "rollout.max_response_length=96"],
    # 8 prompts x 32 samples = 256 sequences on vLLM's 128 CPU sequence slots
    "vllm": ["rollout.rollout_batch_size=1", "rollout.n_samples_per_prompt=32", "algorithm.oversample_factor=8.0",
             "actor.ppo_mini_batch_size=32", "rollout.max_response_length=200"],
}


@pytest.mark.slow
@pytest.mark.parametrize("carry", [False, True], ids=["prefixes", "carry"])
def test_partial_rollout_parks_and_continues_on_the_engine(engine, tmp_path, restore_protocol_weights, carry):
    """``carry=False``: surplus groups dropped, so every step after the first generates and continues what the one
    before parked. ``carry=True`` (the default with partial rollout): the surplus groups are carried as well, and
    every carried group comes in at the next step (trained, or parked again when too old)."""
    args = [f"output_dir={tmp_path}", "run_name=partial", f"model.hf_path={engine.model_dir}",
            f"rollout.backend={engine.kind.name}", f"rollout.engine_urls=[{engine.url}]",
            f"trainer.total_steps={STEPS}", "weight_sync.transport=disk"] + COMMON + SIZES[engine.kind.name]
    if not carry:  # and the continued samples' prefixes from older weights leave the loss
        args += ["algorithm.carry_over_surplus=false", "algorithm.mask_offpolicy_in_partial_rollout=true"]
    proc = run_train(args, timeout=900)
    assert proc.returncode == 0, fail_message(proc) + "\n" + engine.diagnosis()
    steps = read_steps(tmp_path / "partial")
    keys = ("partial_parked", "partial_continued", "partial_dropped_stale", "partial_tokens_reused")
    v = {k: [s[f"rollout/{k}"] for s in steps] for k in keys}
    ds = {k: [s[f"dynamic_sampling/{k}"] for s in steps] for k in ("surplus_carried", "carried_in", "carried_stale")}
    print(f"{engine.kind.name}: {v}; {ds}; aborted {[s['dynamic_sampling/aborted_requests'] for s in steps]}; "
          f"token_age_max {[s['rollout/token_age_max'] for s in steps]}; "
          f"train-rollout max |logprob diff| {[s.get('rollout/train_rollout_logprob_abs_diff_max') for s in steps]}")
    assert sum(v["partial_parked"][:-1]) > 0, v  # aborted samples kept their prefixes
    for k in range(1, STEPS):
        assert v["partial_continued"][k] <= v["partial_parked"][k - 1], v
    assert all(0 <= s["rollout/token_age_max"] <= 1 for s in steps)  # synchronous, partial_max_age=1
    if carry:
        for k in range(1, STEPS):
            assert ds["carried_in"][k] + ds["carried_stale"][k] == ds["surplus_carried"][k - 1], ds
        # what a step left behind (parked prefixes, surplus groups) is used by the next ones
        assert sum(v["partial_continued"][1:]) + sum(v["partial_dropped_stale"][1:]) + sum(ds["carried_in"][1:]) > 0
    else:
        assert sum(ds["surplus_carried"]) == 0, ds
        assert sum(v["partial_continued"][1:]) + sum(v["partial_dropped_stale"][1:]) > 0, v
        # the continued samples' prefixes from older weights stay out of the loss: every other response token is in
        prefix = [s["rollout/offpolicy_prefix_tokens"] for s in steps]
        print(f"{engine.kind.name}: off-policy prefix tokens masked per step {prefix}")
        assert [s["actor/loss_tokens"] for s in steps] == [s["rollout/trained_tokens"] - p for s, p in zip(steps, prefix)]
    diffs = [s["weight_sync/engine_actor_logprob_max_abs_diff"] for s in steps]
    assert max(diffs) <= TOL, diffs
