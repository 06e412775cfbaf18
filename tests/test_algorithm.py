"""Tests of megatron_dapo.algorithm: advantages, policy loss, KL/entropy, reward shaping, presets.

Expected values are computed by hand in the comments next to them.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dapo.algorithm import (
    LOSS_AGG_MODES,
    PRESETS,
    SWITCH_KEYS,
    TABLE1_ABLATION,
    AlgorithmSwitches,
    agg_loss,
    compute_group_advantages,
    compute_policy_loss,
    entropy_from_logits,
    filter_groups,
    kl_penalty,
    overlong_filter_mask,
    resolve_preset,
    soft_overlong_penalty,
    table1_config,
)

HYP = settings(max_examples=60, deadline=None, derandomize=True)


# ------------------------------------------------------------------------------------------
# advantages
# ------------------------------------------------------------------------------------------
def test_group_advantages_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    adv = compute_group_advantages(rewards, eps=1e-6)
    # row 0: mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = 0.577350 -> +-0.5 / 0.577351 = +-0.866024
    expected0 = torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (math.sqrt(1 / 3) + 1e-6)
    torch.testing.assert_close(adv[0], expected0)
    # row 1: identical rewards -> exact zeros
    assert torch.equal(adv[1], torch.zeros(4))
    # row 2: mean 0.75, std sqrt((3 * 0.5625 + 5.0625) / 3) = 1.5 -> [-0.5, -0.5, -0.5, 1.5]
    torch.testing.assert_close(adv[2], torch.tensor([-0.5, -0.5, -0.5, 1.5]), rtol=1e-5, atol=1e-5)
    # Dr. GRPO: only centring
    adv_nostd = compute_group_advantages(rewards, norm_by_std=False)
    torch.testing.assert_close(adv_nostd[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(adv_nostd[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]))


def test_group_advantages_degenerate_and_errors():
    # G == 1: torch.std would be NaN; we return zeros
    for norm in (True, False):
        adv = compute_group_advantages(torch.tensor([[0.3], [1.0]]), norm_by_std=norm)
        assert torch.equal(adv, torch.zeros(2, 1))
    # identical non-representable rewards: the mean may be off by an ulp, result still exact 0
    adv = compute_group_advantages(torch.full((3, 7), 0.1))
    assert torch.equal(adv, torch.zeros(3, 7))
    # integer / bool rewards are promoted to float32
    adv = compute_group_advantages(torch.tensor([[True, False]]))
    assert adv.dtype == torch.float32 and adv[0, 0] > 0 > adv[0, 1]
    with pytest.raises(ValueError, match="group 1"):
        compute_group_advantages(torch.tensor([[1.0, 0.0], [float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="2-D"):
        compute_group_advantages(torch.ones(4))
    with pytest.raises(TypeError):
        compute_group_advantages([[1.0, 0.0]])


@HYP
@given(
    st.lists(
        st.lists(st.sampled_from([0.0, 1.0, -1.0, 0.5, 0.1]), min_size=1, max_size=8),
        min_size=1,
        max_size=6,
    ).filter(lambda rows: len({len(r) for r in rows}) == 1)
)
def test_group_advantages_properties(rows):
    rewards = torch.tensor(rows, dtype=torch.float64)
    for norm in (True, False):
        adv = compute_group_advantages(rewards, norm_by_std=norm)
        assert torch.isfinite(adv).all()
        # zero mean per group
        torch.testing.assert_close(adv.sum(-1), torch.zeros(len(rows), dtype=torch.float64), atol=1e-9, rtol=0)
        for g, row in enumerate(rows):
            if len(set(row)) == 1:
                assert torch.equal(adv[g], torch.zeros(len(row), dtype=torch.float64))
            elif norm:
                # unit Bessel std up to eps
                assert abs(float(adv[g].std()) - 1.0) < 1e-4
            # ordering preserved: larger reward -> larger advantage
            order = sorted(range(len(row)), key=lambda i: row[i])
            vals = adv[g][order]
            assert bool((vals[1:] >= vals[:-1] - 1e-12).all())


# ------------------------------------------------------------------------------------------
# policy loss: hand-computed example
# ------------------------------------------------------------------------------------------
def _hand_inputs():
    # ratios r = exp(logprobs - 0); row 0 has A = +1, row 1 has A = -1 and one padded token.
    ratios = torch.tensor([[1.5, 1.0, 0.5], [1.5, 0.7, 1.0]], dtype=torch.float64)
    logprobs = ratios.log().requires_grad_()
    old = torch.zeros(2, 3, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return logprobs, old, adv, mask


def test_policy_loss_hand_values_token_mean():
    logprobs, old, adv, mask = _hand_inputs()
    # clip range [0.8, 1.28].  Per-token loss max(-A r, -A clip(r)):
    #   row 0 (A=+1): r=1.5 -> max(-1.5, -1.28) = -1.28 (clipped high); r=1 -> -1; r=0.5 -> max(-0.5,-0.8) = -0.5
    #   row 1 (A=-1): r=1.5 -> max(1.5, 1.28) = 1.5; r=0.7 -> max(0.7, 0.8) = 0.8 (clipped low)
    # token-mean = (-1.28 - 1 - 0.5 + 1.5 + 0.8) / 5 = -0.096
    loss, m = compute_policy_loss(logprobs, old, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.28)
    assert loss.item() == pytest.approx(-0.096, abs=1e-12)
    loss.backward()
    # d/dlogprob of -A r is -A r; clipped tokens get 0; divided by 5 tokens
    expected_grad = torch.tensor([[0.0, -1.0 / 5, -0.5 / 5], [1.5 / 5, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected_grad)
    assert m["pg_clipfrac_high"].item() == pytest.approx(0.2)
    assert m["pg_clipfrac_low"].item() == pytest.approx(0.2)
    assert m["pg_clipfrac"].item() == pytest.approx(0.4)
    assert m["pg_clipfrac_dual"].item() == 0.0
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 1.0 + 0.5 + 1.5 + 0.7) / 5)
    # approx_kl = mean(old - new) = -mean(log r)
    expected_kl = -(math.log(1.5) + 0 + math.log(0.5) + math.log(1.5) + math.log(0.7)) / 5
    assert m["approx_kl"].item() == pytest.approx(expected_kl)
    assert m["pg_loss"].item() == pytest.approx(-0.096)
    for v in m.values():
        assert v.dim() == 0 and not v.requires_grad


def test_policy_loss_hand_values_other_modes():
    logprobs, old, adv, mask = _hand_inputs()
    # seq-mean-token-mean: mean(-2.78 / 3, 2.3 / 2) = (-0.926667 + 1.15) / 2
    loss, _ = compute_policy_loss(logprobs, old, adv, mask, loss_agg_mode="seq-mean-token-mean")
    assert loss.item() == pytest.approx((-2.78 / 3 + 2.3 / 2) / 2)
    # seq-mean-token-sum: (-2.78 + 2.3) / 2
    loss, _ = compute_policy_loss(logprobs, old, adv, mask, loss_agg_mode="seq-mean-token-sum")
    assert loss.item() == pytest.approx(-0.24)
    # explicit global counts
    loss, _ = compute_policy_loss(logprobs, old, adv, mask, global_num_tokens=10)
    assert loss.item() == pytest.approx(-0.048)
    loss, _ = compute_policy_loss(logprobs, old, adv, mask, global_num_tokens=torch.tensor(10))
    assert loss.item() == pytest.approx(-0.048)
    loss, _ = compute_policy_loss(
        logprobs, old, adv, mask, loss_agg_mode="seq-mean-token-sum", global_num_seqs=4
    )
    assert loss.item() == pytest.approx(-0.12)


def test_policy_loss_dual_clip_hand_values():
    logprobs, old, adv, mask = _hand_inputs()
    # c = 1.4: row 1 token 0 (A=-1, r=1.5): min(1.5, 1.4) = 1.4 -> (-2.78 + 1.4 + 0.8) / 5 = -0.116
    loss, m = compute_policy_loss(logprobs, old, adv, mask, clip_ratio_c=1.4)
    assert loss.item() == pytest.approx(-0.116)
    assert m["pg_clipfrac_dual"].item() == pytest.approx(0.2)
    assert m["pg_clipfrac"].item() == pytest.approx(0.6)
    loss.backward()
    assert logprobs.grad[1, 0].item() == 0.0  # capped token has no gradient
    with pytest.raises(ValueError, match="clip_ratio_c"):
        compute_policy_loss(logprobs, old, adv, mask, clip_ratio_c=1.0)


def test_policy_loss_rollout_is_weights():
    logprobs, old, adv, mask = _hand_inputs()
    w = torch.tensor([[2.0, 0.5, 1.0], [0.0, 1.0, float("nan")]], dtype=torch.float64)
    # (-1.28*2 - 1*0.5 - 0.5*1 + 1.5*0 + 0.8*1) / 5 = (-2.56 - 0.5 - 0.5 + 0.8) / 5 = -0.552
    loss, _ = compute_policy_loss(logprobs, old, adv, mask, rollout_is_weights=w)
    assert loss.item() == pytest.approx(-0.552)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 1].item() == pytest.approx(-1.0 * 0.5 / 5)


def test_policy_loss_validation_errors():
    lp = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="token-sum-norm"):
        compute_policy_loss(lp, lp, torch.zeros(2), mask, loss_agg_mode="token-sum-norm")
    with pytest.raises(ValueError, match="bogus"):
        agg_loss(lp, mask, "bogus")
    with pytest.raises(ValueError, match="old_logprobs"):
        compute_policy_loss(lp, torch.zeros(2, 4), torch.zeros(2), mask)
    with pytest.raises(ValueError, match="response_mask"):
        compute_policy_loss(lp, lp, torch.zeros(2), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="advantages"):
        compute_policy_loss(lp, lp, torch.zeros(3), mask)
    with pytest.raises(TypeError, match="logprobs"):
        compute_policy_loss(torch.zeros(2, 3, dtype=torch.long), lp, torch.zeros(2), mask)
    with pytest.raises(ValueError, match="0/1"):
        compute_policy_loss(lp, lp, torch.zeros(2), torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="global_num_tokens"):
        compute_policy_loss(lp, lp, torch.zeros(2), mask, global_num_tokens=0)
    with pytest.raises(ValueError, match="clip_ratio_low"):
        compute_policy_loss(lp, lp, torch.zeros(2), mask, clip_ratio_low=1.0)
    with pytest.raises(ValueError, match="rollout_is_weights"):
        compute_policy_loss(lp, lp, torch.zeros(2), mask, rollout_is_weights=torch.ones(2, 2))
    with pytest.raises(ValueError, match="global_num_seqs"):
        agg_loss(lp, mask, "token-mean", global_num_seqs=3)
    # 0/1 float mask and [B, T] advantages are accepted and equal to the bool/[B] form
    a, _ = compute_policy_loss(lp, lp, torch.ones(2), mask.float())
    b, _ = compute_policy_loss(lp, lp, torch.ones(2, 3), mask)
    assert a.item() == b.item() == -1.0


def test_empty_mask_gives_zero_loss_and_zero_grad():
    lp = torch.full((2, 3), float("nan")).requires_grad_()
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for mode in LOSS_AGG_MODES:
        loss, m = compute_policy_loss(lp, lp.detach(), torch.ones(2), mask, loss_agg_mode=mode)
        assert loss.item() == 0.0
        assert all(torch.isfinite(v) for v in m.values())
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------
# Clip-Higher seed examples (DAPO Sec. 3.1)
# ------------------------------------------------------------------------------------------
def _grad_at(new_prob: float, old_prob: float, clip_ratio_high: float) -> float:
    lp = torch.tensor([[math.log(new_prob)]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[math.log(old_prob)]], dtype=torch.float64)
    loss, _ = compute_policy_loss(
        lp, old, torch.ones(1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool),
        clip_ratio_low=0.2, clip_ratio_high=clip_ratio_high,
    )
    loss.backward()
    return float(lp.grad)


def test_clip_higher_seed_examples():
    # eps = 0.2: an exploration token at old prob 0.01 is pushed up only until 0.01 * 1.2 = 0.012
    assert _grad_at(0.0119, 0.01, 0.2) < 0          # still being increased
    assert _grad_at(0.0121, 0.01, 0.2) == 0.0       # clipped: no further increase
    # an exploitation token at old prob 0.9 could reach 0.9 * 1.2 = 1.08 > 1: never clipped in
    # the feasible range (p <= 1 means r <= 1/0.9 = 1.11 < 1.2)
    for p in (0.95, 0.99, 0.999999):
        assert _grad_at(p, 0.9, 0.2) < 0
    # Clip-Higher eps_high = 0.28 raises the low-prob token's ceiling to 0.0128
    assert _grad_at(0.0125, 0.01, 0.28) < 0
    assert _grad_at(0.0129, 0.01, 0.28) == 0.0


# ------------------------------------------------------------------------------------------
# property tests
# ------------------------------------------------------------------------------------------
finite = st.floats(min_value=-3.0, max_value=3.0, allow_nan=False)
adv_st = st.floats(min_value=-4.0, max_value=4.0, allow_nan=False).filter(lambda a: abs(a) > 1e-3)


@HYP
@given(log_ratio=finite, a=adv_st, lo=st.floats(0.0, 0.5), hi=st.floats(0.0, 0.5))
def test_clip_bounds_and_sign(log_ratio, a, lo, hi):
    lp = torch.tensor([[log_ratio]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, m = compute_policy_loss(
        lp, old, torch.tensor([a], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool),
        clip_ratio_low=lo, clip_ratio_high=hi,
    )
    loss.backward()
    r = math.exp(log_ratio)
    objective = -loss.item()
    grad = lp.grad.item()
    if a > 0:
        # the surrogate objective can never exceed A * (1 + eps_high)
        assert objective <= a * (1 + hi) + 1e-12
        # sign: raising a positive-advantage token's log-prob lowers the loss (or does nothing)
        assert grad <= 0
        assert (grad == 0) == (r > 1 + hi)
        assert m["pg_clipfrac_high"].item() == float(r > 1 + hi)
        assert m["pg_clipfrac_low"].item() == 0.0
    else:
        assert objective <= a * (1 - lo) + 1e-12
        assert grad >= 0
        assert (grad == 0) == (r < 1 - lo)
        assert m["pg_clipfrac_low"].item() == float(r < 1 - lo)
        assert m["pg_clipfrac_high"].item() == 0.0


@HYP
@given(
    log_ratios=st.lists(finite, min_size=1, max_size=12),
    advs=st.lists(adv_st, min_size=12, max_size=12),
    c=st.floats(1.01, 10.0),
)
def test_dual_clip_only_acts_on_negative_advantages(log_ratios, advs, c):
    n = len(log_ratios)
    lp = torch.tensor([log_ratios], dtype=torch.float64)
    old = torch.zeros_like(lp)
    mask = torch.ones_like(lp, dtype=torch.bool)
    adv = torch.tensor([advs[:n]], dtype=torch.float64)
    base, _ = compute_policy_loss(lp, old, adv, mask, loss_agg_mode="seq-mean-token-sum")
    dual, md = compute_policy_loss(lp, old, adv, mask, clip_ratio_c=c, loss_agg_mode="seq-mean-token-sum")
    # dual clip never increases the loss and changes it only through tokens with A < 0 and r > c
    assert dual.item() <= base.item() + 1e-12
    pos = adv.abs()
    base_pos, _ = compute_policy_loss(lp, old, pos, mask, loss_agg_mode="seq-mean-token-sum")
    dual_pos, mp = compute_policy_loss(lp, old, pos, mask, clip_ratio_c=c, loss_agg_mode="seq-mean-token-sum")
    assert dual_pos.item() == base_pos.item()
    assert mp["pg_clipfrac_dual"].item() == 0.0
    acting = ((adv < 0) & (lp.exp() > c)).double().mean().item()
    assert md["pg_clipfrac_dual"].item() == pytest.approx(acting)
    # each token's loss is capped at -A * c
    for j in range(n):
        l, _ = compute_policy_loss(lp[:, j : j + 1], old[:, j : j + 1], adv[:, j : j + 1], mask[:, j : j + 1], clip_ratio_c=c)
        if adv[0, j] < 0:
            assert l.item() <= -adv[0, j].item() * c + 1e-12


def _poison(t: torch.Tensor, mask: torch.Tensor, values: list[float]) -> torch.Tensor:
    out = t.clone()
    bad = (~mask).nonzero()
    for k, (i, j) in enumerate(bad.tolist()):
        out[i, j] = values[k % len(values)]
    return out


@HYP
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=5),
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(LOSS_AGG_MODES),
    dual=st.booleans(),
)
def test_masked_positions_never_matter(lengths, seed, mode, dual):
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths) + 2
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    w = torch.rand(B, T, generator=g, dtype=torch.float64)
    kw = dict(loss_agg_mode=mode, clip_ratio_c=3.0 if dual else None)

    clean_lp = lp.clone().requires_grad_()
    clean, m_clean = compute_policy_loss(clean_lp, old, adv, mask, rollout_is_weights=w, **kw)
    clean.backward()

    poison = [float("nan"), float("inf"), -float("inf"), 1e30]
    dirty_lp = _poison(lp, mask, poison).requires_grad_()
    dirty, m_dirty = compute_policy_loss(
        dirty_lp, _poison(old, mask, poison[::-1]), _poison(adv, mask, poison),
        mask, rollout_is_weights=_poison(w, mask, poison), **kw,
    )
    dirty.backward()
    assert torch.isfinite(dirty)
    assert dirty.item() == clean.item()
    assert torch.equal(dirty_lp.grad, clean_lp.grad)
    assert bool((dirty_lp.grad[~mask] == 0).all())
    for k in m_clean:
        assert m_dirty[k].item() == m_clean[k].item(), k


@HYP
@given(
    lengths=st.lists(st.integers(1, 8), min_size=2, max_size=6),
    extra_pad=st.integers(1, 5),
    seed=st.integers(0, 10_000),
)
def test_token_mean_invariant_to_padding_and_order(lengths, extra_pad, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    base, _ = compute_policy_loss(lp, old, adv, mask)

    # extra padding columns holding garbage
    pad = torch.full((B, extra_pad), float("nan"), dtype=torch.float64)
    mask_p = torch.cat([mask, torch.zeros(B, extra_pad, dtype=torch.bool)], dim=1)
    padded, _ = compute_policy_loss(torch.cat([lp, pad], 1), torch.cat([old, pad], 1), adv, mask_p)
    assert padded.item() == pytest.approx(base.item(), rel=1e-12, abs=1e-14)

    # permuted sequence order
    perm = torch.randperm(B, generator=g)
    permuted, _ = compute_policy_loss(lp[perm], old[perm], adv[perm], mask[perm])
    assert permuted.item() == pytest.approx(base.item(), rel=1e-12, abs=1e-14)


# ------------------------------------------------------------------------------------------
# micro-batch accumulation with global_num_tokens equals the full-batch token-mean
# ------------------------------------------------------------------------------------------
def _pad(rows: list[torch.Tensor], fill: float) -> torch.Tensor:
    T = max(r.numel() for r in rows)
    return torch.stack([torch.cat([r, r.new_full((T - r.numel(),), fill)]) for r in rows])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_microbatch_accumulation_matches_full_batch(mode):
    lengths = [1, 3, 1500, 7, 200, 2, 900, 64]  # very different lengths, 8 sequences
    g = torch.Generator().manual_seed(0)
    base_lp = [-torch.rand(n, generator=g) * 3 for n in lengths]
    old = [x + 0.3 * torch.randn(n, generator=g) for x, n in zip(base_lp, lengths)]
    adv = torch.randn(len(lengths), generator=g)

    def run(num_micro: int):
        leaves = [x.clone().requires_grad_() for x in base_lp]
        total_tokens = sum(lengths)
        per = len(lengths) // num_micro
        total = torch.zeros(())
        for k in range(num_micro):
            idx = list(range(k * per, (k + 1) * per))
            lp_mb = _pad([leaves[i] for i in idx], 0.0)  # each micro-batch padded to its own length
            old_mb = _pad([old[i] for i in idx], float("nan"))
            mask_mb = _pad([torch.ones(lengths[i], dtype=torch.bool) for i in idx], False)
            kw = (
                {"global_num_tokens": total_tokens}
                if mode == "token-mean"
                else {"global_num_seqs": len(lengths)}
            )
            loss, _ = compute_policy_loss(lp_mb, old_mb, adv[idx], mask_mb, loss_agg_mode=mode, **kw)
            loss.backward()
            total = total + loss.detach()
        return total, torch.cat([x.grad for x in leaves])

    # plain-PyTorch reference on the flat, unpadded tokens
    flat = torch.cat(base_lp).requires_grad_()
    flat_old = torch.cat(old)
    flat_adv = torch.cat([adv[i].expand(n) for i, n in enumerate(lengths)])
    r = torch.exp(flat - flat_old)
    per_tok = torch.maximum(-flat_adv * r, -flat_adv * r.clamp(0.8, 1.28))
    if mode == "token-mean":
        ref = per_tok.sum() / sum(lengths)
    else:
        pieces = torch.split(per_tok, lengths)
        seq = [p.mean() if mode == "seq-mean-token-mean" else p.sum() for p in pieces]
        ref = torch.stack(seq).mean()
    ref.backward()

    for num_micro in (1, 2, 4):
        value, grad = run(num_micro)
        assert abs(value.item() - ref.item()) <= 1e-6 * abs(ref.item())
        torch.testing.assert_close(grad, flat.grad, rtol=1e-6, atol=0)

    if mode == "token-mean":
        # averaging per-micro-batch means (no global count) is NOT the token-mean
        means = []
        for k in range(4):
            idx = [2 * k, 2 * k + 1]
            mask_mb = _pad([torch.ones(lengths[i], dtype=torch.bool) for i in idx], False)
            l, _ = compute_policy_loss(
                _pad([base_lp[i] for i in idx], 0.0), _pad([old[i] for i in idx], 0.0), adv[idx], mask_mb
            )
            means.append(l.item())
        assert abs(sum(means) / 4 - ref.item()) > 1e-3


# ------------------------------------------------------------------------------------------
# KL and entropy
# ------------------------------------------------------------------------------------------
def test_kl_penalty_hand_values():
    lp = torch.tensor([-1.0, -2.0, -1.0], dtype=torch.float64)
    ref = torch.tensor([-2.0, -1.0, -1.0], dtype=torch.float64)
    # d = lp - ref = [1, -1, 0]
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    # k3 = exp(-d) + d - 1 = [e^-1, e - 2, 0]
    expected = torch.tensor([math.exp(-1), math.e - 2, 0.0], dtype=torch.float64)
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), expected)
    torch.testing.assert_close(kl_penalty(lp, ref, "low_var_kl"), expected)
    with pytest.raises(ValueError, match="'k4'"):
        kl_penalty(lp, ref, "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(lp, ref[:2], "k1")


def test_kl_k3_clamped_and_gradient_finite():
    lp = torch.tensor([-40.0, 0.0, -1e-3], requires_grad=True)
    ref = torch.tensor([0.0, -40.0, 0.0])
    k3 = kl_penalty(lp, ref, "k3")
    # log-ratio 40 -> clamped to 20 -> exp(20) - 21 -> clamped to 10
    assert k3[0].item() == 10.0
    # log-ratio -40 -> clamped to -20: exp(-20) + 20 - 1 ~ 19 -> clamped to 10
    assert k3[1].item() == 10.0
    assert k3[2].item() >= 0
    k3.sum().backward()
    assert torch.isfinite(lp.grad).all()


@HYP
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=20), st.integers(0, 1000))
def test_kl_estimators_properties(lps, seed):
    lp = torch.tensor(lps, dtype=torch.float64)
    ref = lp + torch.randn(len(lps), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert bool((kl_penalty(lp, ref, "k3") >= 0).all())
    assert bool((kl_penalty(lp, ref, "k2") >= 0).all())
    assert torch.equal(kl_penalty(lp, lp, "k3"), torch.zeros(len(lps), dtype=torch.float64))


def test_entropy_from_logits():
    # uniform over 4 -> ln 4
    h = entropy_from_logits(torch.zeros(2, 3, 4))
    torch.testing.assert_close(h, torch.full((2, 3), math.log(4)))
    # matches torch.distributions on random logits, including huge ones
    logits = torch.randn(5, 17, dtype=torch.float64) * 30 + 1000
    ref = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), ref)
    # -inf (masked vocabulary) entries: value and gradient finite, masked entries get 0 grad
    z = torch.tensor([[0.0, -float("inf"), 0.0]], requires_grad=True)
    h = entropy_from_logits(z)
    assert h.item() == pytest.approx(math.log(2))
    h.sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad[0, 1].item() == 0.0
    # gradient agrees with autograd through the naive formula on finite logits
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    gx = torch.autograd.grad(entropy_from_logits(x).sum(), x)[0]
    y = x.detach().clone().requires_grad_()
    p = torch.softmax(y, -1)
    gy = torch.autograd.grad((-(p * torch.log_softmax(y, -1)).sum(-1)).sum(), y)[0]
    torch.testing.assert_close(gx, gy)
    assert entropy_from_logits(torch.zeros(2, 3, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(TypeError):
        entropy_from_logits(torch.zeros(2, 3, dtype=torch.long))


def test_agg_loss_for_entropy_term():
    ent = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), float("inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert agg_loss(ent, mask, "token-mean").item() == pytest.approx(2.0)  # (1+2+3)/3
    assert agg_loss(ent, mask, "seq-mean-token-mean").item() == pytest.approx(2.25)  # (1.5+3)/2
    assert agg_loss(ent, mask, "seq-mean-token-sum").item() == pytest.approx(3.0)  # (3+3)/2
    # sequences without valid tokens are not counted in the sequence mean
    mask2 = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert agg_loss(ent, mask2, "seq-mean-token-mean").item() == pytest.approx(1.5)


# ------------------------------------------------------------------------------------------
# reward shaping / filtering
# ------------------------------------------------------------------------------------------
def test_soft_overlong_penalty_seed_examples():
    lengths = torch.tensor([100, 12288, 12289, 13000, 14336, 16384, 16385, 17000], dtype=torch.int32)
    pen = soft_overlong_penalty(lengths, max_response_length=16384, overlong_buffer_length=4096)
    assert pen.dtype == torch.float32 and pen.shape == (8,)
    expected = [0.0, 0.0, -1 / 4096, -712 / 4096, -0.5, -1.0, -1.0, -1.0]
    torch.testing.assert_close(pen, torch.tensor(expected, dtype=torch.float32))
    assert pen[3].item() == pytest.approx(-0.173828125)
    half = soft_overlong_penalty([14336, 17000], 16384, 4096, penalty_factor=0.5)
    torch.testing.assert_close(half, torch.tensor([-0.25, -0.5]))
    with pytest.raises(ValueError, match=r"response_lengths\[1\]"):
        soft_overlong_penalty(torch.tensor([3, -1]), 16384, 4096)
    with pytest.raises(ValueError, match="overlong_buffer_length"):
        soft_overlong_penalty(torch.tensor([3]), 100, 200)
    with pytest.raises(TypeError):
        soft_overlong_penalty(torch.tensor([3.0]), 100, 20)


def test_overlong_filter_mask():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    out = overlong_filter_mask(["stop", "length", "abort"], mask)
    assert torch.equal(out, torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.float32))
    assert out.data_ptr() != mask.data_ptr() and mask[1].sum() == 3  # input untouched
    bmask = mask.bool()
    out_b = overlong_filter_mask(torch.tensor([True, False, True]), bmask)
    assert out_b.dtype == torch.bool
    assert out_b.tolist() == [[False] * 3, [True] * 3, [False] * 3]
    with pytest.raises(ValueError, match="3 rows"):
        overlong_filter_mask([True, False], mask)
    with pytest.raises(TypeError, match=r"truncated\[1\]"):
        overlong_filter_mask(["stop", 3, "stop"], mask)


def test_filter_groups():
    correct = torch.tensor([[True, True, True], [False, False, False], [True, False, False], [False, True, True]])
    assert filter_groups(correct).tolist() == [False, False, True, True]
    assert filter_groups(torch.tensor([[1, 0], [0, 0]])).tolist() == [True, False]
    assert filter_groups(torch.tensor([[True]])).tolist() == [False]  # G == 1 never mixed
    with pytest.raises(ValueError, match="2-D"):
        filter_groups(torch.tensor([True, False]))


# ------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------
def test_presets_values():
    dapo = resolve_preset("dapo", {})
    assert isinstance(dapo, AlgorithmSwitches)
    assert (dapo.clip_ratio_low, dapo.clip_ratio_high) == (0.2, 0.28)
    assert dapo.loss_agg_mode == "token-mean"
    assert dapo.soft_overlong_punishment and dapo.dynamic_sampling
    assert not dapo.overlong_filtering and not dapo.kl_loss
    grpo = resolve_preset("grpo", {})
    assert (grpo.clip_ratio_low, grpo.clip_ratio_high) == (0.2, 0.2)
    assert grpo.loss_agg_mode == "seq-mean-token-mean"
    assert not any((grpo.soft_overlong_punishment, grpo.overlong_filtering, grpo.dynamic_sampling))
    # no reference model in this recipe: the KL term is off; its beta is kept for callers that enable it
    assert not grpo.kl_loss and grpo.kl_loss_coef == 0.001 and grpo.kl_loss_type == "k3"
    # immutable: a resolved config cannot be changed behind the preset's back
    with pytest.raises(dataclasses.FrozenInstanceError):
        dapo.clip_ratio_high = 9.0
    assert PRESETS["dapo"].clip_ratio_high == 0.28
    assert dapo.as_dict() == PRESETS["dapo"].as_dict() and set(dapo.as_dict()) == set(SWITCH_KEYS)


def test_config_switches_left_unset_take_the_preset_values():
    from megatron_dapo.config import ConfigError, DAPOConfig, load_config

    cfg = DAPOConfig()
    cfg.algorithm.preset = "grpo"
    alg = cfg.resolved_algorithm()
    assert alg.loss_agg_mode == "seq-mean-token-mean" and alg.kl_loss_type == "k3" and alg.clip_ratio_high == 0.2
    assert alg.overlong_penalty_factor == PRESETS["grpo"].overlong_penalty_factor
    # the run supplies L_max / L_cache of eq. 13 (not the paper's 20480 / 4096)
    assert (alg.max_response_length, alg.overlong_buffer_length) == (cfg.rollout.max_response_length,
                                                                     cfg.algorithm.overlong_buffer_length)
    cfg.algorithm.kl_loss_type, cfg.algorithm.overlong_penalty_factor = "k1", 0.5
    alg = cfg.resolved_algorithm()
    assert (alg.kl_loss_type, alg.overlong_penalty_factor) == ("k1", 0.5)
    cfg.algorithm.kl_loss_type = "k9"
    with pytest.raises(ConfigError, match="algorithm.kl_loss_type"):
        cfg.resolved_algorithm()
    for example in sorted(Path(__file__).resolve().parents[1].glob("examples/*/dapo.yaml")):
        assert isinstance(load_config(example, validate=False).resolved_algorithm(), AlgorithmSwitches), example


@pytest.mark.parametrize("key,new_key", [("clip_higher", "algorithm.clip_ratio_high"),
                                         ("token_level_loss", "algorithm.loss_agg_mode")])
def test_config_refuses_removed_ablation_aliases(tmp_path, key, new_key):
    """One key per value: the Table 1 aliases are refused in overrides and in YAML, in one line naming the key."""
    from megatron_dapo.config import ConfigError, load_config

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"algorithm:\n  {key}: true\n")
    for path, overrides in ((None, [f"algorithm.{key}=true"]), (cfg_path, [])):
        with pytest.raises(ConfigError, match=rf"^algorithm\.{key} was removed: set {re.escape(new_key)} ") as e:
            load_config(path, overrides, validate=False)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,refused", [
    (["algorithm.preset=grpo"], False),
    (["algorithm.preset=grpo", "algorithm.kl_loss=false"], False),
    (["algorithm.preset=grpo", "algorithm.kl_loss=true"], True),
    (["algorithm.preset=dapo", "algorithm.kl_loss=true", "algorithm.kl_loss_coef=0.01"], True),
])
def test_config_validate_refuses_kl_loss_without_a_reference_model(overrides, refused):
    from conftest import REPO_ROOT

    from megatron_dapo.config import ConfigError, load_config

    cfg_path = REPO_ROOT / "examples" / "tiny-cpu" / "dapo.yaml"
    if not refused:
        cfg = load_config(cfg_path, overrides)  # validates
        assert cfg.resolved_algorithm().kl_loss is False
        return
    with pytest.raises(ConfigError, match=r"^algorithm\.kl_loss: true needs a reference model") as e:
        load_config(cfg_path, overrides)
    assert "\n" not in str(e.value)


def test_preset_ablation_switches_and_errors():
    cfg = resolve_preset("grpo", {"clip_higher": True, "token_level_loss": True})
    assert cfg.clip_ratio_high == 0.28 and cfg.loss_agg_mode == "token-mean"
    cfg = resolve_preset("dapo", {"clip_higher": False, "token_level_loss": False})
    assert cfg.clip_ratio_high == 0.2 and cfg.loss_agg_mode == "seq-mean-token-mean"
    assert resolve_preset("dapo", {"clip_higher": True, "clip_ratio_high": 0.28}).clip_ratio_high == 0.28
    with pytest.raises(ValueError, match="contradicts clip_higher"):
        resolve_preset("dapo", {"clip_higher": True, "clip_ratio_high": 0.3})
    with pytest.raises(ValueError, match="clip_hihger"):
        resolve_preset("dapo", {"clip_hihger": True})
    with pytest.raises(ValueError, match="'ppo'"):
        resolve_preset("ppo", {})
    with pytest.raises(ValueError, match="loss_agg_mode"):
        resolve_preset("dapo", {"loss_agg_mode": "sum"})
    with pytest.raises(ValueError, match="dynamic_sampling"):
        resolve_preset("dapo", {"dynamic_sampling": 1})
    with pytest.raises(ValueError, match="clip_ratio_c"):
        resolve_preset("dapo", {"clip_ratio_c": 0.5})


def test_table1_rows_are_cumulative_and_end_at_dapo():
    scores = [row["aime24_avg32"] for row in TABLE1_ABLATION]
    assert scores == [30, 36, 38, 41, 42, 50]
    cfgs = [table1_config(i) for i in range(len(TABLE1_ABLATION))]
    assert not cfgs[0].kl_loss and cfgs[0].clip_ratio_high == 0.2
    assert cfgs[1].overlong_filtering and cfgs[2].clip_ratio_high == 0.28
    assert cfgs[3].soft_overlong_punishment and cfgs[4].loss_agg_mode == "token-mean"
    assert not cfgs[4].dynamic_sampling and cfgs[5].dynamic_sampling
    # each row differs from the previous one in exactly the switch it adds
    d = [c.as_dict() for c in cfgs]
    changed = [{k for k in d[i] if d[i][k] != d[i - 1][k]} for i in range(1, 6)]
    assert changed == [
        {"overlong_filtering"}, {"clip_ratio_high"}, {"soft_overlong_punishment"},
        {"loss_agg_mode"}, {"dynamic_sampling"},
    ]
    dapo = resolve_preset("dapo", {}).as_dict()
    assert {k for k in dapo if dapo[k] != d[5][k]} == {"overlong_filtering"}
    assert table1_config("+ Clip-Higher") == cfgs[2]
    with pytest.raises(ValueError, match="row"):
        table1_config(17)
