"""The off-policy (decoupled) objective and the rollout-mismatch corrections of policy_loss.py.

Hand cases share one batch: behaviour ratios ``k = pi_old / pi_rollout`` and policy ratios
``r = pi_theta / pi_old`` are chosen as simple numbers (``rollout_logprobs = 0``,
``old_logprobs = log k``, ``logprobs = log k + log r``); expected values are computed in the comments.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import REPO_ROOT

from megatron_dapo.algorithm import (
    LOSS_AGG_MODES,
    RolloutCorrection,
    compute_decoupled_policy_loss,
    compute_policy_loss,
    geometric_seq_is_mask,
    icepop_token_mask,
    rollout_correction_weights,
    truncated_is_weights,
)
from megatron_dapo.algorithm import product_seq_is_mask, rollout_correction_keep_mask

NAN = float("nan")
# behaviour ratios k (row 1, col 2 is padding and holds NaN in every input there)
K = [[2.0, 0.5, 1.0], [4.0, 1.0, NAN]]
# policy ratios r and advantages as in test_algorithm._hand_inputs: per-token DAPO loss (clip [0.8, 1.28])
#   row 0 (A=+1): r=1.5 -> -1.28 (clipped high), r=1 -> -1, r=0.5 -> -0.5
#   row 1 (A=-1): r=1.5 -> 1.5, r=0.7 -> 0.8 (clipped low)
R = [[1.5, 1.0, 0.5], [1.5, 0.7, 1.0]]


def _inputs():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    old = torch.tensor(K, dtype=torch.float64).log()
    rollout = torch.where(mask, torch.zeros(2, 3, dtype=torch.float64), torch.full((2, 3), NAN, dtype=torch.float64))
    logprobs = (old + torch.tensor(R, dtype=torch.float64).log()).detach().requires_grad_()
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return logprobs, old, rollout, adv, mask


# ------------------------------------------------------------------------------------------
# the three corrections, one at a time
# ------------------------------------------------------------------------------------------
def test_truncated_is_weights_hand_values():
    _, old, rollout, _, mask = _inputs()
    w = truncated_is_weights(old, rollout, mask, cap=3.0)
    # min(k, 3): row 0 [2, 0.5, 1]; row 1 [min(4, 3) = 3, 1, padding -> 0]
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 1.0], [3.0, 1.0, 0.0]], dtype=torch.float64))
    assert not w.requires_grad


def test_geometric_seq_is_mask_hand_values():
    _, old, rollout, _, mask = _inputs()
    keep, rho = geometric_seq_is_mask(old, rollout, mask, 0.5, 1.5)
    # row 0: (2 * 0.5 * 1) ** (1/3) = 1 -> kept; row 1: (4 * 1) ** (1/2) = 2 -> above 1.5, dropped
    torch.testing.assert_close(rho, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert keep.tolist() == [True, False]
    # the bounds are inclusive, and each side may be left open
    assert geometric_seq_is_mask(old, rollout, mask, 0.5, 2.0)[0].tolist() == [True, True]
    assert geometric_seq_is_mask(old, rollout, mask, 1.5, None)[0].tolist() == [False, True]
    assert geometric_seq_is_mask(old, rollout, mask, None, 1.5)[0].tolist() == [True, False]


def test_geometric_seq_is_mask_is_length_normalised():
    # 100 tokens, each with k = 1.01: the full sequence ratio is 1.01 ** 100 = 2.70, the geometric mean 1.01
    n = 100
    old = torch.full((1, n), math.log(1.01), dtype=torch.float64)
    rollout = torch.zeros(1, n, dtype=torch.float64)
    keep, rho = geometric_seq_is_mask(old, rollout, torch.ones(1, n, dtype=torch.bool), 0.99, 1.02)
    assert rho.item() == pytest.approx(1.01) and keep.tolist() == [True]


def test_icepop_token_mask_hand_values():
    _, old, rollout, _, mask = _inputs()
    keep = icepop_token_mask(old, rollout, mask, 0.5, 3.0)
    # k in [0.5, 3] (inclusive): row 0 [2, 0.5, 1] all kept; row 1: 4 dropped, 1 kept, padding False
    assert keep.tolist() == [[True, True, True], [False, True, False]]
    assert icepop_token_mask(old, rollout, mask, 0.6, None).tolist() == [[True, False, True], [True, True, False]]
    # a NaN ratio on a valid token is out of range
    old_nan = old.clone()
    old_nan[0, 2] = NAN
    assert icepop_token_mask(old_nan, rollout, mask, 0.5, 3.0)[0, 2].item() is False


def test_product_seq_is_mask_hand_values():
    _, old, rollout, _, mask = _inputs()
    keep, rho = product_seq_is_mask(old, rollout, mask, 0.5, 3.0)
    # row 0: 2 * 0.5 * 1 = 1 -> kept; row 1: 4 * 1 = 4 -> above 3, dropped (the geometric mean 2 is kept)
    torch.testing.assert_close(rho, torch.tensor([1.0, 4.0], dtype=torch.float64))
    assert keep.tolist() == [True, False]
    assert geometric_seq_is_mask(old, rollout, mask, 0.5, 3.0)[0].tolist() == [True, True]
    # not length-normalised: 100 tokens with k = 1.01 give 1.01 ** 100 = 2.7048, outside [0.99, 1.02]
    n = 100
    keep, rho = product_seq_is_mask(torch.full((1, n), math.log(1.01), dtype=torch.float64),
                                    torch.zeros(1, n, dtype=torch.float64), torch.ones(1, n, dtype=torch.bool),
                                    0.99, 1.02)
    assert rho.item() == pytest.approx(2.704813829) and keep.tolist() == [False]


# one row, k = pi_old / pi_rollout = [0.4, 0.5, 1.0, 2.5, 6.0]: each rule as published
_K5 = [0.4, 0.5, 1.0, 2.5, 6.0]


def _weights5(**kwargs):
    old = torch.tensor([_K5], dtype=torch.float64).log()
    w, _ = rollout_correction_weights(old, torch.zeros(1, 5, dtype=torch.float64), torch.ones(1, 5, dtype=torch.bool),
                                      RolloutCorrection(**kwargs))
    return w[0].tolist()


def test_each_rule_as_published_hand_values():
    # TIS (Yao et al. 2025): min(k, 2)
    assert _weights5(tis_cap=2.0) == pytest.approx([0.4, 0.5, 1.0, 2.0, 2.0])
    # IcePop (arXiv 2510.18855), alpha = 0.5, beta = 5: k inside [0.5, 5] (inclusive), 0 outside
    assert _weights5(icepop_low=0.5, icepop_high=5.0) == pytest.approx([0.0, 0.5, 1.0, 2.5, 0.0])
    # sequence mask, geometric: (0.4 * 0.5 * 1 * 2.5 * 6) ** (1/5) = 3 ** 0.2 = 1.2457 -> in [0.5, 1.3]: weight 1
    assert _weights5(seq_is_mask_low=0.5, seq_is_mask_high=1.3) == pytest.approx([1.0] * 5)
    # sequence mask, product: 0.4 * 0.5 * 1 * 2.5 * 6 = 3 -> above 1.3: the whole sequence gets 0
    assert _weights5(seq_is_mask_low=0.5, seq_is_mask_high=1.3, seq_is_mode="product") == pytest.approx([0.0] * 5)
    assert _weights5(seq_is_mask_high=3.0, seq_is_mode="product") == pytest.approx([1.0] * 5)  # bound inclusive


def test_rules_combined_hand_values():
    # IcePop band [0.5, 5] then TIS cap 2 inside it: [0, min(.5, 2), min(1, 2), min(2.5, 2), 0]
    assert _weights5(tis_cap=2.0, icepop_low=0.5, icepop_high=5.0) == pytest.approx([0.0, 0.5, 1.0, 2.0, 0.0])
    # ... times the geometric sequence mask (rho = 1.2457 in [0.5, 1.3]: kept)
    assert _weights5(tis_cap=2.0, icepop_low=0.5, icepop_high=5.0, seq_is_mask_low=0.5,
                     seq_is_mask_high=1.3) == pytest.approx([0.0, 0.5, 1.0, 2.0, 0.0])
    # ... the product one is computed over every valid token, IcePop-masked ones included (rho = 3 > 1.3): dropped
    assert _weights5(tis_cap=2.0, icepop_low=0.5, icepop_high=5.0, seq_is_mask_low=0.5, seq_is_mask_high=1.3,
                     seq_is_mode="product") == pytest.approx([0.0] * 5)
    # TIS + sequence mask without IcePop: min(k, 2) on the kept sequence
    assert _weights5(tis_cap=2.0, seq_is_mask_high=1.3) == pytest.approx([0.4, 0.5, 1.0, 2.0, 2.0])
    # IcePop + sequence mask without TIS: k inside the band
    assert _weights5(icepop_low=0.5, icepop_high=5.0, seq_is_mask_high=1.3) == pytest.approx([0.0, 0.5, 1.0, 2.5, 0.0])


@pytest.mark.parametrize("kwargs,kept,loss_keep,loss_drop", [
    # IcePop [0.5, 3] drops row 1 token 0: the weighted sum -2.76 over 5 (kept in the denominator) or 4 tokens
    (dict(icepop_low=0.5, icepop_high=3.0), [[True, True, True], [False, True, False]], -2.76 / 5, -2.76 / 4),
    # sequence mask [0.5, 1.5] drops row 1 (2 tokens): -2.78 over 5 or 3 tokens
    (dict(seq_is_mask_low=0.5, seq_is_mask_high=1.5), [[True, True, True], [False, False, False]], -2.78 / 5,
     -2.78 / 3),
    # no masking rule: the option changes nothing (TIS cap 3: 1.74 / 5)
    (dict(tis_cap=3.0), [[True, True, True], [True, True, False]], 1.74 / 5, 1.74 / 5),
])
def test_masked_tokens_in_denominator_hand_values(kwargs, kept, loss_keep, loss_drop):
    logprobs, old, rollout, adv, mask = _inputs()
    assert rollout_correction_keep_mask(old, rollout, mask, RolloutCorrection(**kwargs)).tolist() == kept
    for flag, expected in ((True, loss_keep), (False, loss_drop)):
        loss, _ = compute_decoupled_policy_loss(
            logprobs, old, rollout, adv, mask,
            correction=RolloutCorrection(**kwargs, masked_tokens_in_denominator=flag))
        assert loss.item() == pytest.approx(expected, abs=1e-12), flag
    # with the kept count given as the global denominator, the split halves add up to the unsplit loss
    corr = RolloutCorrection(**kwargs, masked_tokens_in_denominator=False)
    n_kept = sum(map(sum, kept))
    halves = [compute_decoupled_policy_loss(logprobs[i:i + 1], old[i:i + 1], rollout[i:i + 1], adv[i:i + 1],
                                            mask[i:i + 1], correction=corr, global_num_tokens=n_kept)[0]
              for i in range(2)]
    assert (halves[0] + halves[1]).item() == pytest.approx(loss_drop, abs=1e-12)


def test_rollout_correction_weights_product_and_metrics():
    _, old, rollout, _, mask = _inputs()
    assert rollout_correction_weights(old, rollout, mask, None) == (None, {})
    assert rollout_correction_weights(old, rollout, mask, RolloutCorrection()) == (None, {})
    every = RolloutCorrection(tis_cap=3.0, seq_is_mask_low=0.5, seq_is_mask_high=1.5, icepop_low=0.5, icepop_high=3.0)
    w, m = rollout_correction_weights(old, rollout, mask, every)
    # tis [[2, .5, 1], [3, 1, 0]] * seq keep [1, 0] * icepop [[1, 1, 1], [0, 1, 0]]
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    # 5 valid tokens: row 1's 2 tokens dropped by the sequence rule, 1 token (k = 4) by IcePop
    assert m["seq_is_masked_frac"].item() == pytest.approx(2 / 5)
    assert m["icepop_masked_frac"].item() == pytest.approx(1 / 5)
    # only the enabled rules report; IcePop alone weights the kept tokens by k itself (its M(k)) ...
    w, m = rollout_correction_weights(old, rollout, mask, RolloutCorrection(icepop_high=3.0))
    assert set(m) == {"icepop_masked_frac"}
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64))
    # ... and the sequence mask alone gives 0/1 weights: rho = [1, 2], row 1 above 1.5
    w, m = rollout_correction_weights(old, rollout, mask, RolloutCorrection(seq_is_mask_high=1.5))
    assert set(m) == {"seq_is_masked_frac"}
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64))


# ------------------------------------------------------------------------------------------
# the decoupled objective
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,expected_loss,expected_grad", [
    # TIS cap 3, weights [[2, .5, 1], [3, 1, -]]:
    #   (-1.28*2 - 1*0.5 - 0.5*1 + 1.5*3 + 0.8*1) / 5 = 1.74 / 5
    #   grad of unclipped tokens = -A * r * w / 5: row 0 [0, -0.5/5, -0.5/5], row 1 [+1.5*3/5, 0 (clipped), 0]
    (dict(tis_cap=3.0), 1.74 / 5, [[0.0, -0.1, -0.1], [0.9, 0.0, 0.0]]),
    # sequence mask [0.5, 1.5] drops row 1: (-1.28 - 1 - 0.5) / 5
    (dict(seq_is_mask_low=0.5, seq_is_mask_high=1.5), -2.78 / 5, [[0.0, -0.2, -0.1], [0.0, 0.0, 0.0]]),
    # IcePop [0.5, 3] drops row 1 token 0 (k = 4) and weights the others by k = [[2, .5, 1], [-, 1]]:
    #   (-1.28*2 - 1*0.5 - 0.5*1 + 0.8*1) / 5 = -2.76 / 5; grad row 0 [0 (clipped), -1*.5/5, -.5*1/5]
    (dict(icepop_low=0.5, icepop_high=3.0), -2.76 / 5, [[0.0, -0.1, -0.1], [0.0, 0.0, 0.0]]),
    # IcePop [0.5, 3] with TIS cap 1.5: in-band weights min(k, 1.5) = [[1.5, .5, 1], [-, 1]]:
    #   (-1.28*1.5 - 0.5 - 0.5 + 0.8) / 5 = -2.12 / 5
    (dict(tis_cap=1.5, icepop_low=0.5, icepop_high=3.0), -2.12 / 5, [[0.0, -0.1, -0.1], [0.0, 0.0, 0.0]]),
    # product sequence mask [0.5, 3]: rho = [2 * .5 * 1, 4 * 1] = [1, 4] drops row 1 (the geometric rho = 2
    # would keep it): (-1.28 - 1 - 0.5) / 5
    (dict(seq_is_mask_low=0.5, seq_is_mask_high=3.0, seq_is_mode="product"), -2.78 / 5,
     [[0.0, -0.2, -0.1], [0.0, 0.0, 0.0]]),
    # geometric sequence mask [0.5, 3] keeps both rows (rho = [1, 2]): the plain loss (-2.78 + 1.5 + 0.8) / 5;
    # grad row 1 token 0: -A * r / 5 = 1.5 / 5
    (dict(seq_is_mask_low=0.5, seq_is_mask_high=3.0), (-1.28 - 1 - 0.5 + 1.5 + 0.8) / 5,
     [[0.0, -0.2, -0.1], [0.3, 0.0, 0.0]]),
    # all three: row 0 weighted [2, .5, 1], row 1 dropped: (-2.56 - 0.5 - 0.5) / 5
    (dict(tis_cap=3.0, seq_is_mask_low=0.5, seq_is_mask_high=1.5, icepop_low=0.5, icepop_high=3.0),
     -3.56 / 5, [[0.0, -0.1, -0.1], [0.0, 0.0, 0.0]]),
])
def test_decoupled_loss_hand_values(kwargs, expected_loss, expected_grad):
    logprobs, old, rollout, adv, mask = _inputs()
    loss, m = compute_decoupled_policy_loss(logprobs, old, rollout, adv, mask, correction=RolloutCorrection(**kwargs),
                                            clip_ratio_low=0.2, clip_ratio_high=0.28)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor(expected_grad, dtype=torch.float64))
    # the clip is against the proximal policy: the clip fractions are those of r, whatever the weights
    assert m["pg_clipfrac_high"].item() == pytest.approx(0.2) and m["pg_clipfrac_low"].item() == pytest.approx(0.2)
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 1.0 + 0.5 + 1.5 + 0.7) / 5)


def _random_batch(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b, t = 6, 11
    lengths = torch.tensor([11, 1, 7, 4, 9, 2])
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    old = (-3.0 + torch.randn(b, t, generator=g)).to(dtype)
    logprobs = (old + 0.3 * torch.randn(b, t, generator=g).to(dtype)).detach().requires_grad_()
    adv = torch.randn(b, generator=g).to(dtype)
    return logprobs, old, adv, mask


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("dual", [None, 3.0])
def test_zero_staleness_reduces_exactly_to_todays_loss(mode, dual):
    """rollout_logprobs == old_logprobs: every correction on, loss and gradient equal compute_policy_loss
    bit for bit (the weights are exactly 1, and x * 1.0 == x)."""
    logprobs, old, adv, mask = _random_batch(3)
    common = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=dual, loss_agg_mode=mode)
    ref, ref_m = compute_policy_loss(logprobs, old, adv, mask, **common)
    (ref_grad,) = torch.autograd.grad(ref, logprobs)
    for correction in (RolloutCorrection(tis_cap=2.0), RolloutCorrection(tis_cap=1.0, seq_is_mask_low=0.999,
                                                                         seq_is_mask_high=1.001, icepop_low=0.5,
                                                                         icepop_high=5.0), RolloutCorrection(), None,
                       RolloutCorrection(icepop_low=0.5, icepop_high=5.0, seq_is_mask_low=0.999,
                                         seq_is_mask_high=1.001, seq_is_mode="product",
                                         masked_tokens_in_denominator=False)):
        loss, m = compute_decoupled_policy_loss(logprobs, old, old.clone(), adv, mask, correction=correction, **common)
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert torch.equal(loss, ref) and torch.equal(grad, ref_grad), correction
        for k, v in ref_m.items():
            assert torch.equal(m[k], v), k
        assert all(m[k].item() == 0.0 for k in ("seq_is_masked_frac", "icepop_masked_frac") if k in m)
    # no rollout log-probs at all: today's loss
    loss, _ = compute_decoupled_policy_loss(logprobs, old, None, adv, mask, correction=RolloutCorrection(tis_cap=2.0),
                                            **common)
    assert torch.equal(loss, ref)


def test_decoupled_loss_equals_weighted_advantages_with_stale_samples():
    """Stale samples: the TIS-weighted loss's gradient is the plain loss's with advantages * min(k, cap)
    (the weight is detached: it scales the gradient, it is not differentiated)."""
    logprobs, old, adv, mask = _random_batch(5, torch.float64)
    g = torch.Generator().manual_seed(9)
    rollout = old + 0.5 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    loss, _ = compute_decoupled_policy_loss(logprobs, old, rollout, adv, mask,
                                            correction=RolloutCorrection(tis_cap=1.5))
    (grad,) = torch.autograd.grad(loss, logprobs)
    w = torch.exp(old - rollout).clamp(max=1.5)
    ref, _ = compute_policy_loss(logprobs, old, adv.unsqueeze(1) * w, mask)
    (ref_grad,) = torch.autograd.grad(ref, logprobs)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(grad, torch.autograd.grad(compute_policy_loss(logprobs, old, adv, mask)[0], logprobs)[0])


def test_masked_positions_never_matter():
    logprobs, old, rollout, adv, mask = _inputs()
    rollout = rollout.clone()
    rollout[1, 2] = math.inf  # padding: inf / NaN there change nothing
    loss, m = compute_decoupled_policy_loss(logprobs, old, rollout, adv, mask,
                                            correction=RolloutCorrection(tis_cap=3.0, icepop_low=0.5,
                                                                         seq_is_mask_high=1.5))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(v) for v in m.values())


def test_correction_validation_errors():
    _, old, rollout, _, mask = _inputs()
    with pytest.raises(ValueError, match="rollout_logprobs shape"):
        rollout_correction_weights(old, rollout[:, :2], mask, RolloutCorrection(tis_cap=2.0))
    with pytest.raises(TypeError, match="correction must be a RolloutCorrection or None, got dict"):
        rollout_correction_weights(old, rollout, mask, {"tis_cap": 2.0})
    with pytest.raises(ValueError, match="response_mask shape"):
        icepop_token_mask(old, rollout, mask[:, :2], 0.5, 2.0)
    with pytest.raises(TypeError, match="rollout_logprobs"):
        geometric_seq_is_mask(old, rollout.long(), mask, 0.5, 2.0)
    with pytest.raises(ValueError, match="tis cap must be > 0"):
        truncated_is_weights(old, rollout, mask, 0.0)
    with pytest.raises(ValueError, match="icepop: low bound 3.0 > high bound 2.0"):
        icepop_token_mask(old, rollout, mask, 3.0, 2.0)
    with pytest.raises(ValueError, match="seq_is_mask: low bound must be a finite value >= 0"):
        geometric_seq_is_mask(old, rollout, mask, -1.0, 2.0)
    with pytest.raises(ValueError, match="seq_is_mask: give at least one"):
        geometric_seq_is_mask(old, rollout, mask, None, None)
    with pytest.raises(ValueError, match="icepop: high bound must be > 0"):
        icepop_token_mask(old, rollout, mask, None, 0.0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(tis_cap=0.0), "algorithm.tis_cap: must be > 0, got 0.0"),
    (dict(tis_cap=NAN), "algorithm.tis_cap: must be > 0, got nan"),
    (dict(seq_is_mask_low=-1.0), "algorithm.seq_is_mask_low: low bound must be a finite value >= 0, got -1.0"),
    (dict(seq_is_mask_low=math.inf), "algorithm.seq_is_mask_low: low bound must be a finite value >= 0, got inf"),
    (dict(seq_is_mask_high=0.0), "algorithm.seq_is_mask_high: high bound must be > 0, got 0.0"),
    (dict(seq_is_mask_low=3.0, seq_is_mask_high=2.0), "algorithm.seq_is_mask_low: low bound 3.0 > high bound 2.0"),
    (dict(icepop_low=-0.5), "algorithm.icepop_low: low bound must be a finite value >= 0, got -0.5"),
    (dict(icepop_high=NAN), "algorithm.icepop_high: high bound must be > 0, got nan"),
    (dict(icepop_low=3.0, icepop_high=2.0), "algorithm.icepop_low: low bound 3.0 > high bound 2.0"),
    (dict(seq_is_mode="arithmetic"),
     "algorithm.seq_is_mode: must be one of ['geometric', 'product'], got 'arithmetic'"),
])
def test_rollout_correction_rejects_bad_bounds_naming_the_flag(kwargs, message):
    with pytest.raises(ValueError) as e:
        RolloutCorrection(**kwargs)
    assert str(e.value) == message


def test_rollout_correction_enabled_and_frozen():
    assert not RolloutCorrection().enabled
    for kwargs in (dict(tis_cap=2.0), dict(seq_is_mask_low=0.9), dict(seq_is_mask_high=1.1), dict(icepop_low=0.5),
                   dict(icepop_high=5.0)):
        c = RolloutCorrection(**kwargs)
        assert c.enabled, kwargs
        assert c.seq_is_mask_enabled == ("seq_is_mask_low" in kwargs or "seq_is_mask_high" in kwargs)
        assert c.icepop_enabled == ("icepop_low" in kwargs or "icepop_high" in kwargs)
    # open-ended bounds (0 / inf) are accepted, as by the functions
    assert RolloutCorrection(icepop_low=0.0, icepop_high=math.inf).icepop_enabled
    with pytest.raises(AttributeError):
        RolloutCorrection().tis_cap = 2.0  # type: ignore[misc]


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------
CONFIG = str(REPO_ROOT / "examples" / "tiny-cpu" / "dapo.yaml")


@pytest.mark.parametrize("override,first_line", [
    ("algorithm.icepop_low=1.5", "algorithm.icepop_low: must be in [0, 1] or null (got 1.5)"),
    ("algorithm.icepop_high=0.5", "algorithm.icepop_high: must be >= 1 or null (got 0.5)"),
    ("algorithm.seq_is_mask_low=-0.1", "algorithm.seq_is_mask_low: must be in [0, 1] or null (got -0.1)"),
    ("algorithm.seq_is_mask_high=nan", "algorithm.seq_is_mask_high: must be >= 1 or null (got nan)"),
    ("algorithm.seq_is_mode=arithmetic", "algorithm.seq_is_mode: must be one of geometric, product, got 'arithmetic'"),
])
def test_config_rejects_bounds_that_exclude_one(override, first_line, tmp_path):
    from megatron_dapo.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, [f"output_dir={tmp_path}", override])
    assert str(e.value).splitlines() == [first_line]


def test_prefix_mask_needs_partial_rollout(tmp_path):
    from megatron_dapo.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, [f"output_dir={tmp_path}", "algorithm.mask_offpolicy_in_partial_rollout=true"])
    assert str(e.value).splitlines() == [
        "algorithm.mask_offpolicy_in_partial_rollout: true masks the prefixes that partial rollout continues, but "
        "rollout.mode is 'deterministic': set rollout.mode=partial or leave it false"]
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", "rollout.mode=partial",
                               "algorithm.mask_offpolicy_in_partial_rollout=true"])
    assert cfg.algorithm.mask_offpolicy_in_partial_rollout is True


def test_config_corrections_reach_the_loss_settings(tmp_path):
    from megatron_dapo.actor.megatron_actor import LossSettings
    from megatron_dapo.config import load_config

    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", "algorithm.tis_cap=2.0", "algorithm.seq_is_mask_low=0.999",
                               "algorithm.seq_is_mask_high=1.001", "algorithm.icepop_low=0.5",
                               "algorithm.icepop_high=5", "algorithm.seq_is_mode=product",
                               "algorithm.masked_tokens_in_denominator=false"])
    a = cfg.algorithm
    assert (a.tis_cap, a.seq_is_mask_low, a.seq_is_mask_high, a.icepop_low, a.icepop_high) == (2.0, 0.999, 1.001,
                                                                                               0.5, 5.0)
    assert (a.seq_is_mode, a.masked_tokens_in_denominator) == ("product", False)
    # the config's correction fields become one RolloutCorrection, carried by LossSettings
    expected = RolloutCorrection(tis_cap=2.0, seq_is_mask_low=0.999, seq_is_mask_high=1.001, icepop_low=0.5,
                                 icepop_high=5.0, seq_is_mode="product", masked_tokens_in_denominator=False)
    assert RolloutCorrection.from_config(a) == expected
    assert LossSettings(correction=RolloutCorrection.from_config(a)).correction.enabled
    assert LossSettings().correction is None
    defaults = load_config(CONFIG, [f"output_dir={tmp_path}"]).algorithm
    assert (defaults.seq_is_mask_low, defaults.seq_is_mask_high, defaults.icepop_low, defaults.icepop_high) == (
        None, None, None, None)
    assert (defaults.seq_is_mode, defaults.masked_tokens_in_denominator) == ("geometric", True)
    assert not RolloutCorrection.from_config(defaults).enabled


@pytest.mark.parametrize("overrides, sources", [
    ([], []),
    (["rollout.colocated=false", "rollout.max_staleness=1"], ["rollout.max_staleness=1"]),
    (["rollout.mode=partial"], ["rollout.mode=partial", "algorithm.carry_over_surplus"]),
    (["rollout.mode=partial", "algorithm.carry_over_surplus=false"], ["rollout.mode=partial"]),
    (["algorithm.carry_over_surplus=true"], ["algorithm.carry_over_surplus"]),
])
def test_no_stale_token_trains_uncorrected(overrides, sources, tmp_path):
    """Issue 22 item 1: a run whose tokens can come from older weights gets TIS (OFF_POLICY_TIS_CAP) unless it
    configures a correction itself; a synchronous run keeps the plain loss."""
    from megatron_dapo.actor.megatron_actor import LossSettings
    from megatron_dapo.algorithm import OFF_POLICY_TIS_CAP
    from megatron_dapo.config import load_config

    cfg = load_config(CONFIG, [f"output_dir={tmp_path}"] + overrides).validate()
    assert cfg.stale_token_sources() == sources
    correction = LossSettings.from_config(cfg).correction
    assert correction.tis_cap == (OFF_POLICY_TIS_CAP if sources else None)
    assert correction.enabled == bool(sources)
    if sources:  # a rule the user set is kept as set: no default cap is added to it
        own = load_config(CONFIG, [f"output_dir={tmp_path}", "algorithm.icepop_low=0.5", "algorithm.icepop_high=3"]
                          + overrides)
        assert LossSettings.from_config(own).correction.tis_cap is None
        capped = load_config(CONFIG, [f"output_dir={tmp_path}", "algorithm.tis_cap=5"] + overrides)
        assert LossSettings.from_config(capped).correction.tis_cap == 5.0
