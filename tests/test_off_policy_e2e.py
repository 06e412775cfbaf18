"""End to end through the real CLI: the rollout-mismatch corrections configured next to ``algorithm.tis_cap``
reach the loss, and what they masked reaches TensorBoard; scoring streams on the default rollout path."""
from __future__ import annotations

import json

import pytest

from helpers import fail_message, read_scalars, run_train

SMALL = ["rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=4", "actor.ppo_mini_batch_size=16",
         "trainer.export_hf=false", "trainer.save_interval=0", "trainer.eval_interval=0"]


@pytest.mark.slow
def test_corrections_train_and_report_masked_fractions(tmp_path, tiny_model):  # noqa: F811
    proc = run_train([f"output_dir={tmp_path}", "run_name=offp", f"model.hf_path={tiny_model}",
                      "trainer.total_steps=2", "rollout.mode=streaming", "algorithm.tis_cap=2.0",
                      "algorithm.seq_is_mask_low=0.999", "algorithm.seq_is_mask_high=1.001",
                      "algorithm.icepop_low=0.5", "algorithm.icepop_high=5.0"] + SMALL)
    assert proc.returncode == 0, fail_message(proc)
    run = tmp_path / "offp"
    cfg_text = (run / "config.yaml").read_text()
    for line in ("seq_is_mask_low: 0.999", "seq_is_mask_high: 1.001", "icepop_low: 0.5", "icepop_high: 5.0"):
        assert line in cfg_text, line
    assert [json.loads(x)["step"] for x in (run / "steps.jsonl").read_text().splitlines()] == [1, 2]
    sc = read_scalars(run / "tb")
    for key in ("actor/seq_is_masked_frac", "actor/icepop_masked_frac"):
        assert [s for s, _ in sc[key]] == [1, 2], key
        assert all(0.0 <= v <= 1.0 for _, v in sc[key]), sc[key]
    # scoring time is a part of the rollout's wall time (the union of the scoring intervals)
    assert all(v > 0 for _, v in sc["timing/reward_s"])
    assert all(r <= w for (_, r), (_, w) in zip(sc["timing/reward_s"], sc["timing/rollout_s"]))
    assert all(v < 0.5 for _, v in sc["actor/icepop_masked_frac"])  # engine and actor agree: few tokens dropped
