"""Overlong filtering and the TIS cap through the trainer's batch builder and the Megatron actor
(see dist_scripts/loss_paths_worker.py): gradients, not flags."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_scripts.common import make_models, torchrun  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss_paths")
    models = make_models(root / "models")
    torchrun("loss_paths_worker.py", 1, {"HF": str(models["qwen2"]), "OUT": str(root / "report.json")})
    return json.loads((root / "report.json").read_text())


@pytest.mark.slow
def test_overlong_filtering_truncated_responses_get_no_gradient(report):
    # the trainer's build_train_batch with algorithm.overlong_filtering: truncated rows have an all-zero loss mask
    assert report["mask_rows_truncated"] == [0.0, 0.0]
    assert all(n > 0 for n in report["mask_rows_kept"]) and len(report["mask_rows_kept"]) == 6
    # replacing the truncated responses by other tokens changes nothing in the actor's gradient ...
    assert report["truncated_differ"]
    assert report["filtered_grad_diff"] == 0.0 and report["filtered_grad_norm"] > 1e-3
    # ... while without filtering the same replacement does change it (the check can fail)
    assert report["unfiltered_grad_diff"] > 1e-4


@pytest.mark.slow
def test_tis_cap_weights_the_loss_by_min_ratio_cap(report):
    # gradient with rollout_is_weights = min(w, cap) == no-TIS gradient with advantages * min(w, cap)
    assert report["tis_vs_scaled"] <= 1e-6 * max(1.0, report["grad_scale"])
    # and it is neither the uncapped nor the unweighted gradient
    assert report["tis_vs_uncapped"] > 1e-3 and report["tis_vs_none"] > 1e-3


@pytest.mark.slow
def test_off_policy_corrections_through_the_actor(report):
    # zero staleness (rollout_logprobs == old_logprobs): TIS + sequence mask + IcePop change nothing, bit for bit
    assert report["zero_staleness_grad_diff"] == 0.0
    # a row outside the bounds is dropped: the gradient is the plain one with its advantages zeroed
    for name in ("seq", "icepop", "icepop_tis"):
        assert report[f"{name}_vs_scaled"] <= 1e-6 * max(1.0, report["grad_scale"]), name
    # what was masked reaches the train_step metrics (token fraction over the mini-batch)
    assert 0 < report["expected_masked_frac"] < 1
    for name in ("seq", "icepop", "icepop_tis"):
        assert report[f"{name}_masked_frac"] == pytest.approx(report["expected_masked_frac"]), name
