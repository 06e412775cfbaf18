"""Token-level policy-gradient losses for DAPO / GRPO (pure torch).

Contents
--------
* :func:`agg_loss` -- the loss aggregation shared by the policy, entropy and KL terms
  (``token-mean`` = DAPO eq. 8, ``seq-mean-token-mean`` = GRPO eq. 6, ``seq-mean-token-sum``).
* :func:`compute_policy_loss` -- decoupled-clip surrogate (DAPO eq. 10, "Clip-Higher"), optional
  dual clip (Ye et al. 2020, "Mastering complex control in MOBA games", eq. 5) and optional
  truncated importance-sampling weights for rollout/trainer mismatch.
* :func:`compute_decoupled_policy_loss` -- the off-policy (decoupled) objective of AReaL
  (arXiv 2505.24298, eq. 5): the clip is taken against the proximal policy (``old_logprobs``) and
  the behaviour policy (the engine's ``rollout_logprobs``) enters only through a detached,
  truncated importance weight; optionally combined with the two rejection rules below.
* :func:`truncated_is_weights` -- token-level truncated IS weight ``min(pi_old / pi_rollout, cap)``
  (TIS; Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training").
* :func:`geometric_seq_is_mask` -- sequence-level masked IS with the geometric-mean ratio
  (MIS; Liu, Li et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the
  Training-Inference Mismatch").
* :func:`product_seq_is_mask` -- the same rejection rule on the full sequence ratio ``prod_t k_t``
  (verl's sequence-level rollout IS).
* :func:`icepop_token_mask` -- IcePop token masking (Ling team, "Every Step Evolves: Scaling
  Reinforcement Learning for Trillion-Scale Thinking Model", arXiv 2510.18855, Sec. IcePop).
* :class:`RolloutCorrection` -- which of the three are enabled, their bounds and the loss denominator
  (validated once); its docstring states how the rules combine.
* :func:`rollout_correction_weights` -- the product of the three, as one per-token weight.
* :func:`rollout_correction_keep_mask` -- the tokens no rule drops (the token-mean denominator when
  :attr:`RolloutCorrection.masked_tokens_in_denominator` is False).
* :func:`kl_penalty` -- k1/k2/k3 per-token KL estimators (Schulman, "Approximating KL
  divergence", 2020; k3 is the "low_var_kl" of verl).
* :func:`entropy_from_logits` -- per-position entropy of a categorical distribution.

Conventions
-----------
All per-token tensors are ``[B, T]`` (B sequences, T response positions, right padded).
``response_mask`` marks valid response tokens (bool, or 0/1 of any dtype).  Masked positions
never influence values or gradients, even if the inputs hold NaN/inf there: every input is passed
through ``torch.where`` before any arithmetic, so no ``0 * inf`` can appear in forward or backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

__all__ = [
    "LOSS_AGG_MODES",
    "KL_PENALTY_KINDS",
    "RolloutCorrection",
    "agg_loss",
    "compute_policy_loss",
    "compute_decoupled_policy_loss",
    "SEQ_IS_MODES",
    "geometric_seq_is_mask",
    "icepop_token_mask",
    "kl_penalty",
    "product_seq_is_mask",
    "rollout_correction_keep_mask",
    "rollout_correction_weights",
    "truncated_is_weights",
    "entropy_from_logits",
]

#: Loss aggregation modes understood by :func:`agg_loss`.
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

#: Sequence ratios of the sequence-level mask (``algorithm.seq_is_mode``): :func:`geometric_seq_is_mask`
#: and :func:`product_seq_is_mask`.
SEQ_IS_MODES = ("geometric", "product")

#: Canonical KL estimator names and their accepted aliases (verl spellings).
KL_PENALTY_KINDS = {
    "k1": "k1",
    "kl": "k1",
    "k2": "k2",
    "mse": "k2",
    "k3": "k3",
    "low_var_kl": "k3",
}

# verl clamps the log-ratio before exp() so that exp never overflows (which would turn the
# backward pass into 0 * inf = NaN); the PPO ratio uses the same bound.
_LOG_RATIO_CLAMP = 20.0
# verl clamps the k3 estimate itself to [-10, 10].
_K3_VALUE_CLAMP = 10.0

CountLike = Union[int, float, torch.Tensor, None]


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _as_bool_mask(response_mask: torch.Tensor, name: str = "response_mask") -> torch.Tensor:
    """Return ``response_mask`` as a bool tensor; non-bool masks must hold only 0 and 1."""
    if not isinstance(response_mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(response_mask).__name__}")
    if response_mask.dtype == torch.bool:
        return response_mask
    finite_binary = (response_mask == 0) | (response_mask == 1)
    if not bool(finite_binary.all()):
        bad = (~finite_binary).nonzero()[0].tolist()
        raise ValueError(
            f"{name} must be bool or hold only 0/1; found {response_mask[tuple(bad)].item()!r} "
            f"at index {tuple(bad)}"
        )
    return response_mask != 0


def _check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_2d(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(t.shape)}")


def _check_shape(t: torch.Tensor, name: str, shape: tuple[int, ...], ref_name: str) -> None:
    """Raise ``ValueError`` naming both tensors when ``t``'s shape is not ``shape`` (that of ``ref_name``)."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(t.shape)} != {ref_name} shape {tuple(shape)}")


def _count_to_tensor(count: CountLike, name: str, like: torch.Tensor) -> Optional[torch.Tensor]:
    """Validate a global token/sequence count (int, float or 0-dim tensor) and return a tensor."""
    if count is None:
        return None
    if isinstance(count, bool):
        raise TypeError(f"{name} must be an int or a 0-dim tensor, got bool")
    if isinstance(count, torch.Tensor):
        if count.numel() != 1:
            raise ValueError(f"{name} must be a scalar (0-dim) tensor, got shape {tuple(count.shape)}")
        value = float(count.detach().reshape(()).item())
        out = count.detach().reshape(()).to(device=like.device, dtype=like.dtype)
    elif isinstance(count, (int, float)):
        value = float(count)
        out = torch.tensor(value, device=like.device, dtype=like.dtype)
    else:
        raise TypeError(f"{name} must be an int or a 0-dim tensor, got {type(count).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite count, got {value}")
    return out


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def agg_loss(
    values: torch.Tensor,
    mask: torch.Tensor,
    loss_agg_mode: str,
    global_num_tokens: CountLike = None,
    global_num_seqs: CountLike = None,
) -> torch.Tensor:
    """Aggregate per-token values ``[B, T]`` into a scalar loss.

    Modes (``loss_agg_mode``):

    * ``"token-mean"`` -- DAPO eq. 8 / 12: ``sum(values[mask]) / N_tok`` where ``N_tok`` is the
      number of valid tokens, or ``global_num_tokens`` when given.  Pass the number of valid tokens
      of the whole mini-batch (all micro-batches, all data-parallel ranks): the values returned for
      each micro-batch then *sum* to the mini-batch token-mean, so gradient accumulation by summation
      is exact however unevenly the tokens are split.  (If your data-parallel all-reduce *averages*
      gradients, multiply the loss by the DP world size.)
    * ``"seq-mean-token-mean"`` -- GRPO eq. 6: mean over sequences of each sequence's token mean.
      Only sequences with at least one valid token count; ``global_num_seqs`` overrides that
      count in the same way as ``global_num_tokens``.
    * ``"seq-mean-token-sum"`` -- mean over sequences of each sequence's token sum (same sequence
      count rule).

    Args:
        values: floating tensor ``[B, T]``; may hold NaN/inf where ``mask`` is False.
        mask: bool (or 0/1) tensor ``[B, T]``.
        loss_agg_mode: one of :data:`LOSS_AGG_MODES`.
        global_num_tokens: positive int or 0-dim tensor (``token-mean`` only).
        global_num_seqs: positive int or 0-dim tensor (``seq-mean-*`` modes only).

    Returns:
        0-dim tensor with ``values``' dtype.  If no token is valid and no global count is given the
        result is ``0`` (with a zero gradient).

    Raises:
        ValueError: unknown ``loss_agg_mode`` (named in the message), shape mismatch, non-binary
            mask, non-positive global count.
        TypeError: non-tensor / non-floating ``values``.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(
            f"unknown loss_agg_mode {loss_agg_mode!r}; expected one of {list(LOSS_AGG_MODES)}"
        )
    _check_float(values, "values")
    _check_2d(values, "values")
    mask = _as_bool_mask(mask, "mask")
    if mask.shape != values.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match values shape {tuple(values.shape)}"
        )
    return _aggregate(values, mask, loss_agg_mode, global_num_tokens, global_num_seqs)


def _aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    loss_agg_mode: str,
    global_num_tokens: CountLike,
    global_num_seqs: CountLike,
) -> torch.Tensor:
    """:func:`agg_loss` without the input checks (``mask`` already bool, shapes already equal)."""
    masked = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))

    if loss_agg_mode == "token-mean":
        if global_num_seqs is not None:
            raise ValueError("global_num_seqs is only used by the seq-mean-* loss_agg_modes")
        denom = _count_to_tensor(global_num_tokens, "global_num_tokens", values)
        if denom is None:
            denom = mask.sum().to(values.dtype).clamp(min=1)
        return masked.sum() / denom

    if global_num_tokens is not None:
        raise ValueError(
            f"global_num_tokens is only used by loss_agg_mode='token-mean', not {loss_agg_mode!r}; "
            "pass global_num_seqs instead"
        )
    tokens_per_seq = mask.sum(dim=-1)
    seq_sums = masked.sum(dim=-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_values = seq_sums / tokens_per_seq.to(values.dtype).clamp(min=1)
    else:  # seq-mean-token-sum
        seq_values = seq_sums
    denom = _count_to_tensor(global_num_seqs, "global_num_seqs", values)
    if denom is None:
        denom = (tokens_per_seq > 0).sum().to(values.dtype).clamp(min=1)
    return seq_values.sum() / denom


# --------------------------------------------------------------------------------------------
# policy loss
# --------------------------------------------------------------------------------------------
def compute_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
    global_num_tokens: CountLike = None,
    global_num_seqs: CountLike = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled-clip PPO surrogate loss of DAPO (arXiv 2503.14476, eq. 10 with eq. 8 aggregation).

    Per valid token, with ``r = exp(logprobs - old_logprobs)`` and advantage ``A``::

        loss_t = max(-A * r, -A * clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high))
        if clip_ratio_c is not None and A < 0:          # dual clip
            loss_t = min(loss_t, -A * clip_ratio_c)
        loss_t *= rollout_is_weights                     # optional truncated IS weight (detached)

    then ``loss = agg_loss(loss_t, response_mask, loss_agg_mode, ...)``.  Minimising ``loss``
    maximises the DAPO objective.  The log-ratio is clamped to ``[-20, 20]`` before ``exp`` (as in
    verl) so that the ratio never overflows; tokens in that regime are clipped anyway.

    Args:
        logprobs: ``[B, T]`` floating; log pi_theta(o_t | q, o_<t) of the sampled tokens (carries grad).
        old_logprobs: ``[B, T]`` floating; log-probs under pi_theta_old (the trainer recomputes them
            with the actor before the step's first update: the proximal policy of
            :func:`compute_decoupled_policy_loss`); treated as constant (detached).
        advantages: ``[B, T]``, ``[B, 1]`` or ``[B]`` floating; broadcast per token; detached.
        response_mask: ``[B, T]`` bool (or 0/1); False/0 positions are ignored entirely, even when
            any input holds NaN/inf there.
        clip_ratio_low: epsilon_low >= 0 (< 1); lower clip bound is ``1 - clip_ratio_low``.
        clip_ratio_high: epsilon_high >= 0; upper clip bound is ``1 + clip_ratio_high``
            (DAPO "Clip-Higher": 0.28 vs 0.2).
        clip_ratio_c: dual-clip constant ``c > 1`` (e.g. 3 or 10), or None to disable.
        loss_agg_mode: see :func:`agg_loss`.
        global_num_tokens / global_num_seqs: mini-batch-wide divisors, see :func:`agg_loss`.
        rollout_is_weights: optional ``[B, T]`` floating importance weights (already truncated by
            the caller); detached here.

    Returns:
        ``(loss, metrics)``: ``loss`` is a 0-dim tensor (dtype of ``logprobs``).  ``metrics`` maps
        to 0-dim detached tensors, each a plain mean over this call's valid tokens (0 when there
        are none):

        * ``pg_loss`` -- the aggregated loss value.
        * ``pg_clipfrac`` -- fraction of tokens whose gradient is cut by any clip
          (= high | low | dual below).
        * ``pg_clipfrac_high`` -- ``A > 0`` and ``r > 1 + clip_ratio_high``.
        * ``pg_clipfrac_low`` -- ``A < 0`` and ``r < 1 - clip_ratio_low``.
        * ``pg_clipfrac_dual`` -- ``A < 0`` and ``r > clip_ratio_c`` (0 without dual clip).
        * ``approx_kl`` -- mean of ``old_logprobs - logprobs`` (the k1 estimator of
          KL(pi_old || pi_theta) on samples from pi_old; verl's ``ppo_kl`` convention).
        * ``ratio_mean`` -- mean of ``r``.

    Raises:
        ValueError: shape mismatch (names the tensor), unknown ``loss_agg_mode`` (names it),
            invalid clip ratios, ``clip_ratio_c <= 1``, non-positive global counts.
        TypeError: non-tensor or non-floating inputs.
    """
    for name, t in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages)):
        _check_float(t, name)
    _check_2d(logprobs, "logprobs")
    shape = tuple(logprobs.shape)
    _check_shape(old_logprobs, "old_logprobs", shape, "logprobs")
    mask = _as_bool_mask(response_mask, "response_mask")
    _check_shape(mask, "response_mask", shape, "logprobs")
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        advantages = advantages.unsqueeze(-1)
    if advantages.dim() != 2 or advantages.shape[0] != shape[0] or advantages.shape[1] not in (1, shape[1]):
        raise ValueError(
            f"advantages shape {tuple(advantages.shape)} must be [B, T], [B, 1] or [B] with "
            f"logprobs shape {shape}"
        )
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(
            f"unknown loss_agg_mode {loss_agg_mode!r}; expected one of {list(LOSS_AGG_MODES)}"
        )
    if not (0.0 <= float(clip_ratio_low) < 1.0):
        raise ValueError(f"clip_ratio_low must be in [0, 1), got {clip_ratio_low}")
    if not (float(clip_ratio_high) >= 0.0 and math.isfinite(float(clip_ratio_high))):
        raise ValueError(f"clip_ratio_high must be a finite value >= 0, got {clip_ratio_high}")
    if clip_ratio_c is not None and not (float(clip_ratio_c) > 1.0):
        raise ValueError(f"clip_ratio_c (dual clip) must be > 1, got {clip_ratio_c}")
    if rollout_is_weights is not None:
        _check_float(rollout_is_weights, "rollout_is_weights")
        _check_shape(rollout_is_weights, "rollout_is_weights", shape, "logprobs")

    dtype, device = logprobs.dtype, logprobs.device
    zero = torch.zeros((), dtype=dtype, device=device)
    # The only path from the loss back to `logprobs` runs through this where(): masked NaN/inf in
    # logprobs/old_logprobs become an exact 0 log-ratio before exp(), and where()'s backward hands
    # masked positions an exact 0 gradient, whatever (even NaN) arrives from downstream.  Masked
    # NaN/inf in advantages or rollout_is_weights only reach the per-token loss at masked
    # positions, which the aggregation drops with a second where().
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach().to(dtype), zero)
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    neg_adv = -advantages.detach().to(dtype)  # [B, 1] or [B, T]; broadcasts against ratio
    low, high = 1.0 - float(clip_ratio_low), 1.0 + float(clip_ratio_high)
    per_token = torch.maximum(neg_adv * ratio, neg_adv * ratio.clamp(low, high))
    if clip_ratio_c is not None:
        c = float(clip_ratio_c)
        # cap -A*c where A < 0, +inf (no cap) elsewhere; computed at the advantages' shape
        cap = torch.where(neg_adv > 0, neg_adv * c, torch.full((), math.inf, dtype=dtype, device=device))
        per_token = torch.minimum(per_token, cap)
    if rollout_is_weights is not None:
        per_token = per_token * rollout_is_weights.detach().to(dtype)

    loss = _aggregate(per_token, mask, loss_agg_mode, global_num_tokens, global_num_seqs)

    with torch.no_grad():
        # Masked positions have log_ratio == 0, ratio == 1, so none of the flags below can be
        # set there (high >= 1 >= low, c > 1) and they add 0 to the sums.
        n_valid = mask.sum().to(dtype).clamp(min=1)
        frac_high = ((neg_adv < 0) & (ratio > high)).sum().to(dtype) / n_valid
        frac_low = ((neg_adv > 0) & (ratio < low)).sum().to(dtype) / n_valid
        if clip_ratio_c is not None:
            frac_dual = ((neg_adv > 0) & (ratio > c)).sum().to(dtype) / n_valid
        else:
            frac_dual = torch.zeros((), dtype=dtype, device=device)
        metrics = {
            "pg_loss": loss.detach().clone(),
            # the three cases are disjoint (sign of A, and low < 1 < c), so their sum is "any clip"
            "pg_clipfrac": frac_high + frac_low + frac_dual,
            "pg_clipfrac_high": frac_high,
            "pg_clipfrac_low": frac_low,
            "pg_clipfrac_dual": frac_dual,
            "approx_kl": -log_ratio.detach().sum() / n_valid,
            "ratio_mean": 1.0 + (ratio - 1.0).sum() / n_valid,
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# off-policy / rollout-mismatch corrections
# --------------------------------------------------------------------------------------------
def _behaviour_log_ratio(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked ``(log(pi_old / pi_rollout), bool mask)``, both ``[B, T]``; the log-ratio is 0 where
    ``response_mask`` is False (so masked NaN/inf never reach any arithmetic)."""
    _check_float(old_logprobs, "old_logprobs")
    _check_float(rollout_logprobs, "rollout_logprobs")
    _check_2d(old_logprobs, "old_logprobs")
    shape = tuple(old_logprobs.shape)
    _check_shape(rollout_logprobs, "rollout_logprobs", shape, "old_logprobs")
    mask = _as_bool_mask(response_mask, "response_mask")
    _check_shape(mask, "response_mask", shape, "old_logprobs")
    old = old_logprobs.detach()
    rollout = rollout_logprobs.detach().to(device=old.device, dtype=old.dtype)
    mask = mask.to(old.device)
    zero = torch.zeros((), dtype=old.dtype, device=old.device)
    return torch.where(mask, old - rollout, zero), mask


def _check_bound_values(low: Optional[float], high: Optional[float], low_name: str, high_name: str) -> None:
    """Raise ValueError (naming ``low_name`` / ``high_name``) for a negative or non-finite ``low``, a
    non-positive ``high`` or ``low > high``; a None bound is no bound."""
    if low is not None and not (math.isfinite(float(low)) and float(low) >= 0.0):
        raise ValueError(f"{low_name}: low bound must be a finite value >= 0, got {low}")
    if high is not None and not (float(high) > 0.0):
        raise ValueError(f"{high_name}: high bound must be > 0, got {high}")
    if low is not None and high is not None and float(low) > float(high):
        raise ValueError(f"{low_name}: low bound {low} > high bound {high}")


def _check_bounds(low: Optional[float], high: Optional[float], name: str) -> None:
    if low is None and high is None:
        raise ValueError(f"{name}: give at least one of the low / high bounds")
    _check_bound_values(low, high, name, name)


def _log_in_range(log_value: torch.Tensor, low: Optional[float], high: Optional[float]) -> torch.Tensor:
    """``low <= exp(log_value) <= high`` (a None or 0 / inf bound is no bound), compared in log space
    so that no ratio is ever exponentiated; NaN is out of range."""
    keep = ~torch.isnan(log_value)
    if low is not None and float(low) > 0.0:
        keep &= log_value >= math.log(float(low))
    if high is not None and math.isfinite(float(high)):
        keep &= log_value <= math.log(float(high))
    return keep


def truncated_is_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    cap: float,
) -> torch.Tensor:
    """Token-level truncated importance weight (TIS) between the proximal and the behaviour policy.

    Per valid token::

        w_t = min(exp(old_logprobs_t - rollout_logprobs_t), cap)      # = min(pi_old / pi_rollout, C)

    Source: Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"
    (the TIS weight), and the behaviour-policy weight of AReaL's decoupled PPO (Fu et al. 2025,
    arXiv 2505.24298, eq. 5), which AReaL bounds by dropping tokens above the cap instead (that is
    :func:`icepop_token_mask` with ``high=cap``).  The log-ratio is clamped to ``[-20, 20]`` before
    ``exp`` so that no weight overflows.

    Args:
        old_logprobs: ``[B, T]`` floating; log-probs of the sampled tokens under the proximal policy
            (the actor before this step's update).
        rollout_logprobs: ``[B, T]`` floating; the engine's (behaviour policy's) log-probs of the same
            tokens.
        response_mask: ``[B, T]`` bool (or 0/1).
        cap: truncation ``C > 0``.  With ``C >= 1`` a zero-staleness batch (``old == rollout``) has
            every weight exactly 1.

    Returns:
        ``[B, T]`` detached weights, dtype of ``old_logprobs``; 0 where ``response_mask`` is False.

    Raises:
        ValueError: shape mismatch (names the tensor), ``cap <= 0``.  TypeError: non-floating input.
    """
    if not (float(cap) > 0.0):
        raise ValueError(f"tis cap must be > 0, got {cap}")
    log_ratio, mask = _behaviour_log_ratio(old_logprobs, rollout_logprobs, response_mask)
    w = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)).clamp(max=float(cap))
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


def geometric_seq_is_mask(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    low: Optional[float],
    high: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence-level masked importance sampling with the geometric-mean ratio.

    Per sequence ``i`` with valid tokens ``t = 1..|y_i|``::

        rho_i = exp( (1 / |y_i|) * sum_t (old_logprobs_it - rollout_logprobs_it) )
              = (prod_t pi_old(y_it) / pi_rollout(y_it)) ** (1 / |y_i|)
        keep_i = low <= rho_i <= high

    A sequence outside the bounds gets no loss at all (the caller multiplies its tokens' weights by
    0).  The geometric mean makes the rule independent of the response length, unlike the full
    sequence ratio ``prod_t`` which degenerates for long responses.  Source: masked IS (MIS) of Liu,
    Li et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference
    Mismatch" (building on TIS, Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training"); the geometric-mean form is the length-normalised sequence ratio of their
    rejection rule.  A sequence without valid tokens has ``rho = 1``; a NaN ratio is out of range.

    Args:
        old_logprobs, rollout_logprobs: ``[B, T]`` floating (proximal / behaviour log-probs).
        response_mask: ``[B, T]`` bool (or 0/1).
        low: lower bound ``>= 0`` on ``rho`` (None or 0: none), e.g. 0.999.
        high: upper bound on ``rho`` (None or inf: none), e.g. 1.001.

    Returns:
        ``(keep, rho)``: ``keep`` ``[B]`` bool, ``rho`` ``[B]`` detached, dtype of ``old_logprobs``.

    Raises:
        ValueError: shape mismatch, both bounds None, a negative / non-finite low bound, a
            non-positive high bound, ``low > high``.  TypeError: non-floating input.
    """
    return _seq_is_mask(old_logprobs, rollout_logprobs, response_mask, low, high, "geometric")


def product_seq_is_mask(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    low: Optional[float],
    high: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence-level masked importance sampling with the full (product) sequence ratio.

    Per sequence ``i`` with valid tokens ``t = 1..|y_i|``::

        rho_i = exp( sum_t (old_logprobs_it - rollout_logprobs_it) ) = prod_t pi_old(y_it) / pi_rollout(y_it)
        keep_i = low <= rho_i <= high

    The ratio of the whole sequence's probabilities, so the rule tightens with the response length (a
    per-token ratio of 1.01 over 100 tokens gives ``rho = 2.70``).  Source: verl's sequence-level rollout
    importance ratio (``rollout_is_level: sequence``, the product of the token ratios; rejection with
    ``rollout_is_mode: mask``), the sequence-level IS of Liu, Li et al. 2025 (see
    :func:`geometric_seq_is_mask`).  The comparison is made in log space, so no product overflows; the
    returned ``rho`` is ``exp`` of the log-ratio sum clamped to ``[-20, 20]``.  A sequence without valid
    tokens has ``rho = 1``; a NaN ratio is out of range.

    Args, Returns, Raises: as :func:`geometric_seq_is_mask`.
    """
    return _seq_is_mask(old_logprobs, rollout_logprobs, response_mask, low, high, "product")


def _seq_is_mask(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    low: Optional[float],
    high: Optional[float],
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep [B] bool, rho [B])`` of the sequence ratio of ``mode`` (one of :data:`SEQ_IS_MODES`)."""
    _check_bounds(low, high, "seq_is_mask")
    log_ratio, mask = _behaviour_log_ratio(old_logprobs, rollout_logprobs, response_mask)
    seq_log_ratio = log_ratio.sum(dim=-1)
    if mode == "geometric":
        seq_log_ratio = seq_log_ratio / mask.sum(dim=-1).to(log_ratio.dtype).clamp(min=1)
    keep = _log_in_range(seq_log_ratio, low, high)
    return keep, torch.exp(seq_log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))


def icepop_token_mask(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    low: Optional[float],
    high: Optional[float],
) -> torch.Tensor:
    """IcePop token masking: tokens whose training/inference probability ratio is outside ``[low, high]``.

    Per valid token, with ``k_t = exp(old_logprobs_t - rollout_logprobs_t)`` (= pi_train / pi_infer
    under the same weights)::

        keep_t = low <= k_t <= high          # IcePop's M(k; alpha, beta) != 0

    A dropped token contributes no loss and no gradient; by default it stays in the loss normaliser (the
    ``1 / |y_i|`` of the IcePop objective counts every sampled token; see
    :attr:`RolloutCorrection.masked_tokens_in_denominator`).  IcePop's full masking function is
    ``M(k) = k if alpha <= k <= beta else 0``: this function gives the band, and
    :func:`rollout_correction_weights` the in-band weight ``k`` (capped by ``tis_cap`` when that is set).
    Source: the Ling team, "Every Step Evolves:
    Scaling Reinforcement Learning for Trillion-Scale Thinking Model" (Ring-1T), arXiv 2510.18855,
    IcePop objective (alpha = 0.5, beta = 5 there).  A NaN ratio is out of range.

    Args:
        old_logprobs, rollout_logprobs: ``[B, T]`` floating (proximal / behaviour log-probs).
        response_mask: ``[B, T]`` bool (or 0/1).
        low: ``alpha >= 0`` (None or 0: none).  high: ``beta`` (None or inf: none).

    Returns:
        ``[B, T]`` bool: True for valid tokens that keep their loss (False outside ``response_mask``).

    Raises:
        ValueError: shape mismatch, both bounds None, a negative / non-finite low bound, a
            non-positive high bound, ``low > high``.  TypeError: non-floating input.
    """
    _check_bounds(low, high, "icepop")
    log_ratio, mask = _behaviour_log_ratio(old_logprobs, rollout_logprobs, response_mask)
    return mask & _log_in_range(log_ratio, low, high)


@dataclass(frozen=True)
class RolloutCorrection:
    """The behaviour-policy corrections of :func:`rollout_correction_weights`, validated once.

    Each field is the ``algorithm.*`` flag of the same name; ``None`` switches that bound (or rule) off.
    A rule is on when at least one of its bounds is set.  With ``k_t = pi_old / pi_rollout`` (proximal over
    behaviour probability of token ``t``, computed as ``exp(old_t - rollout_t)``), the per-token weight is::

        w_t = base_t * seq_keep_i * icepop_keep_t                                   (detached)
        base_t = min(k_t, tis_cap)      if tis_cap is set                 # TIS
               = k_t                    elif an icepop bound is set       # IcePop
               = 1                      otherwise                         # masks only
        seq_keep_i    = seq_is_mask_low <= rho_i <= seq_is_mask_high      # sequence-level masked IS
        icepop_keep_t = icepop_low <= k_t <= icepop_high                  # IcePop band

    so each rule alone is the published one and together they multiply:

    * TIS alone: ``min(k, C)`` -- Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
      Off-Policy RL Training"; also the behaviour weight of AReaL's decoupled PPO (arXiv 2505.24298, eq. 5).
    * IcePop alone: ``k`` inside ``[alpha, beta]``, 0 outside -- the masking function ``M(k)`` of the Ling
      team's IcePop (arXiv 2510.18855).  With ``tis_cap`` too, a kept token's ``k`` is then capped:
      ``min(k, C)`` inside the band (the same as IcePop when ``C >= beta``).
    * Sequence mask alone: weight 1 on the kept sequences, 0 on the others -- masked IS (MIS) of Liu, Li
      et al. 2025, "When Speed Kills Stability", with ``rho_i`` the geometric-mean ratio
      (:func:`geometric_seq_is_mask`, ``seq_is_mode="geometric"``) or verl's product ratio ``prod_t k_t``
      (:func:`product_seq_is_mask`, ``seq_is_mode="product"``).  It multiplies whatever ``base_t`` the
      token rules give (e.g. TIS + MIS, as in that paper).

    A token is *masked* when ``seq_keep_i * icepop_keep_t == 0``.  It never contributes loss or gradient;
    ``masked_tokens_in_denominator`` says whether it still counts in the loss normaliser (the token count of
    ``token-mean``, the per-sequence token count and sequence count of the ``seq-mean-*`` modes): True keeps
    it, as AReaL and NeMo-RL do (and the ``1 / |y_i|`` of the IcePop objective); False removes it, as verl
    (the rejection mask multiplies the response mask) and slime do.

    Attributes:
        tis_cap: truncation ``C > 0`` of the token weight ``min(pi_old / pi_rollout, C)``
            (:func:`truncated_is_weights`).
        seq_is_mask_low, seq_is_mask_high: bounds on the sequence ratio ``rho_i`` of ``seq_is_mode``;
            low ``>= 0`` and finite, high ``> 0``.
        seq_is_mode: ``"geometric"`` (``exp(mean_t log k_t)``) or ``"product"`` (``exp(sum_t log k_t)``),
            see :data:`SEQ_IS_MODES`.
        icepop_low, icepop_high: IcePop's ``alpha`` / ``beta`` on the token ratio ``k``
            (:func:`icepop_token_mask`); low ``>= 0`` and finite, high ``> 0``.
        masked_tokens_in_denominator: keep masked tokens in the loss normaliser (True) or drop them (False).

    Raises:
        ValueError: on construction, naming the flag: ``tis_cap <= 0`` (or NaN), a negative / non-finite
            low bound, a non-positive high bound, a low bound above its high bound, an unknown
            ``seq_is_mode``.  These are the checks of the functions; :meth:`megatron_dapo.config.DAPOConfig.validate`
            is stricter for the config (lows in ``[0, 1]``, highs ``>= 1``, so that a fresh batch keeps every
            token).
    """

    tis_cap: Optional[float] = None
    seq_is_mask_low: Optional[float] = None
    seq_is_mask_high: Optional[float] = None
    icepop_low: Optional[float] = None
    icepop_high: Optional[float] = None
    seq_is_mode: str = "geometric"
    masked_tokens_in_denominator: bool = True

    def __post_init__(self) -> None:
        if self.tis_cap is not None and not (float(self.tis_cap) > 0.0):
            raise ValueError(f"algorithm.tis_cap: must be > 0, got {self.tis_cap}")
        _check_bound_values(self.seq_is_mask_low, self.seq_is_mask_high,
                            "algorithm.seq_is_mask_low", "algorithm.seq_is_mask_high")
        _check_bound_values(self.icepop_low, self.icepop_high, "algorithm.icepop_low", "algorithm.icepop_high")
        if self.seq_is_mode not in SEQ_IS_MODES:
            raise ValueError(f"algorithm.seq_is_mode: must be one of {list(SEQ_IS_MODES)}, got {self.seq_is_mode!r}")

    @property
    def seq_is_mask_enabled(self) -> bool:
        """Whether the sequence-level mask is on (either bound set)."""
        return self.seq_is_mask_low is not None or self.seq_is_mask_high is not None

    @property
    def icepop_enabled(self) -> bool:
        """Whether IcePop is on (either bound set)."""
        return self.icepop_low is not None or self.icepop_high is not None

    @property
    def enabled(self) -> bool:
        """Whether any correction is on (otherwise the loss is the plain on-policy one)."""
        return self.tis_cap is not None or self.seq_is_mask_enabled or self.icepop_enabled

    @property
    def drops_masked_tokens(self) -> bool:
        """Whether masked tokens leave the loss normaliser: a masking rule is on and
        ``masked_tokens_in_denominator`` is False."""
        return not self.masked_tokens_in_denominator and (self.seq_is_mask_enabled or self.icepop_enabled)

    @classmethod
    def from_config(cls, alg: Any) -> "RolloutCorrection":
        """The corrections of an algorithm config: any object with the seven fields as attributes, e.g.
        :class:`megatron_dapo.config.AlgorithmConfig` (``cfg.algorithm``).

        Raises:
            ValueError: as the constructor.  AttributeError: ``alg`` lacks one of the fields.
        """
        return cls(tis_cap=alg.tis_cap, seq_is_mask_low=alg.seq_is_mask_low, seq_is_mask_high=alg.seq_is_mask_high,
                   icepop_low=alg.icepop_low, icepop_high=alg.icepop_high, seq_is_mode=alg.seq_is_mode,
                   masked_tokens_in_denominator=alg.masked_tokens_in_denominator)


def _correction_masks(
    log_ratio: torch.Tensor, mask: torch.Tensor, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
    c: RolloutCorrection,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(seq_keep [B] bool, icepop_keep [B, T] bool)`` of the enabled masking rules (None when off)."""
    seq_keep = tok_keep = None
    if c.seq_is_mask_enabled:
        seq_keep, _ = _seq_is_mask(old_logprobs, rollout_logprobs, mask, c.seq_is_mask_low, c.seq_is_mask_high,
                                   c.seq_is_mode)
        seq_keep = seq_keep.to(log_ratio.device)
    if c.icepop_enabled:
        tok_keep = icepop_token_mask(old_logprobs, rollout_logprobs, mask, c.icepop_low,
                                     c.icepop_high).to(log_ratio.device)
    return seq_keep, tok_keep


def rollout_correction_keep_mask(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    correction: RolloutCorrection,
) -> torch.Tensor:
    """The valid tokens that no masking rule of ``correction`` drops: ``response_mask & seq_keep_i &
    icepop_keep_t`` (see :class:`RolloutCorrection`; ``response_mask`` itself when neither masking rule is on).

    A token's fate depends on its own row only, so the kept-token count of a batch is the sum of its rows'
    counts however the rows are split over micro-batches and data-parallel ranks.

    Args:
        old_logprobs, rollout_logprobs: ``[B, T]`` floating (proximal / behaviour log-probs).
        response_mask: ``[B, T]`` bool (or 0/1).
        correction: the rules and their bounds.

    Returns:
        ``[B, T]`` bool on ``old_logprobs``' device.

    Raises:
        ValueError / TypeError: as :func:`rollout_correction_weights`.
    """
    if not isinstance(correction, RolloutCorrection):
        raise TypeError(f"correction must be a RolloutCorrection, got {type(correction).__name__}")
    log_ratio, mask = _behaviour_log_ratio(old_logprobs, rollout_logprobs, response_mask)
    seq_keep, tok_keep = _correction_masks(log_ratio, mask, old_logprobs, rollout_logprobs, correction)
    if seq_keep is not None:
        mask = mask & seq_keep.unsqueeze(-1)
    if tok_keep is not None:
        mask = mask & tok_keep
    return mask


def rollout_correction_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    correction: Optional[RolloutCorrection],
) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
    """One detached per-token weight from the enabled behaviour-policy corrections.

    ::

        w_t = base_t * seq_keep_i * icepop_keep_t

    as stated in :class:`RolloutCorrection`: ``base_t = min(k_t, tis_cap)`` (:func:`truncated_is_weights`)
    when ``tis_cap`` is set, else ``k_t`` when an ``icepop_*`` bound is set (IcePop's ``M(k)``), else 1;
    ``seq_keep_i`` of :func:`geometric_seq_is_mask` / :func:`product_seq_is_mask` (``seq_is_mode``; 1 when
    both ``seq_is_mask_*`` are None) and ``icepop_keep_t`` of :func:`icepop_token_mask` (1 when both
    ``icepop_*`` are None).  With zero staleness (``rollout_logprobs == old_logprobs``: ``k_t = 1``
    exactly), ``tis_cap >= 1`` and bounds that contain 1, every valid weight is exactly 1.

    Args:
        old_logprobs, rollout_logprobs: ``[B, T]`` floating (proximal / behaviour log-probs).
        response_mask: ``[B, T]`` bool (or 0/1).
        correction: the enabled rules and their bounds (:class:`RolloutCorrection`); None: none.

    Returns:
        ``(weights, metrics)``: ``weights`` ``[B, T]`` (0 outside ``response_mask``), or None when no
        correction is enabled (``correction`` None or not :attr:`RolloutCorrection.enabled`).
        ``metrics`` (0-dim detached tensors, fractions of this call's valid tokens, present for the
        enabled rules): ``seq_is_masked_frac`` (tokens in sequences dropped by the sequence rule),
        ``icepop_masked_frac`` (tokens dropped by IcePop).

    Raises:
        ValueError / TypeError: as the functions above.  TypeError: ``correction`` is neither None nor a
            :class:`RolloutCorrection`.
    """
    if correction is not None and not isinstance(correction, RolloutCorrection):
        raise TypeError(f"correction must be a RolloutCorrection or None, got {type(correction).__name__}")
    if correction is None or not correction.enabled:
        return None, {}
    c = correction
    log_ratio, mask = _behaviour_log_ratio(old_logprobs, rollout_logprobs, response_mask)
    dtype = log_ratio.dtype
    if c.tis_cap is not None:
        weights = truncated_is_weights(old_logprobs, rollout_logprobs, mask, c.tis_cap)
    elif c.icepop_enabled:
        k = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
        weights = torch.where(mask, k, torch.zeros((), dtype=dtype, device=k.device))
    else:
        weights = mask.to(dtype)
    n_valid = mask.sum().to(dtype).clamp(min=1)
    metrics: dict[str, torch.Tensor] = {}
    seq_keep, tok_keep = _correction_masks(log_ratio, mask, old_logprobs, rollout_logprobs, c)
    if seq_keep is not None:
        weights = weights * seq_keep.unsqueeze(-1).to(dtype)
        metrics["seq_is_masked_frac"] = (mask & ~seq_keep.unsqueeze(-1)).sum().to(dtype) / n_valid
    if tok_keep is not None:
        weights = weights * tok_keep.to(dtype)
        metrics["icepop_masked_frac"] = (mask & ~tok_keep).sum().to(dtype) / n_valid
    return weights, metrics


def compute_decoupled_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    rollout_logprobs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    correction: Optional[RolloutCorrection] = None,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
    global_num_tokens: CountLike = None,
    global_num_seqs: CountLike = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Off-policy (decoupled) DAPO loss: the clip against the proximal policy, the behaviour policy
    only through a detached importance weight.

    Decoupled PPO (Fu et al. 2025, "AReaL: A Large-Scale Asynchronous Reinforcement Learning System
    for Language Reasoning", arXiv 2505.24298, eq. 5), with three policies: pi_behav generated the
    tokens (the engine; ``rollout_logprobs``), pi_prox is the actor before this step's update
    (``old_logprobs``, recomputed by the trainer), pi_theta is being optimised (``logprobs``).  Per
    valid token, with ``r_t = pi_theta / pi_prox`` and advantage ``A``::

        loss_t = w_t * max(-A * r_t, -A * clip(r_t, 1 - clip_ratio_low, 1 + clip_ratio_high))
        w_t    = base_t * seq_keep_i * icepop_keep_t                                (detached)

    (dual clip as in :func:`compute_policy_loss`), aggregated by ``loss_agg_mode``.  The weight is
    :func:`rollout_correction_weights` (the rules and their combination: :class:`RolloutCorrection`):
    AReaL's behaviour weight truncated at ``tis_cap`` (:func:`truncated_is_weights`; AReaL itself drops
    tokens above the cap, which is ``icepop_high=cap``), times the optional sequence-level mask
    (:func:`geometric_seq_is_mask` / :func:`product_seq_is_mask`) and IcePop's band
    (:func:`icepop_token_mask`).  The same weight corrects both staleness (one-step-off generation) and
    engine/trainer numerical mismatch.  When :attr:`RolloutCorrection.drops_masked_tokens`, the loss is
    aggregated over :func:`rollout_correction_keep_mask` instead of ``response_mask`` (then
    ``global_num_tokens`` / ``global_num_seqs`` must count the kept tokens / sequences with a kept token,
    and the clip metrics are means over the kept tokens).

    Zero staleness: with ``rollout_logprobs == old_logprobs`` every weight is exactly 1 (for
    ``tis_cap >= 1`` or None and bounds containing 1), so loss and gradient equal
    :func:`compute_policy_loss` bit for bit.  With ``rollout_logprobs=None`` or no correction enabled
    this *is* :func:`compute_policy_loss` (today's on-policy loss).

    Args:
        logprobs: ``[B, T]`` floating, carries the gradient.
        old_logprobs: ``[B, T]`` floating proximal log-probs (detached).
        rollout_logprobs: ``[B, T]`` floating behaviour log-probs (detached), or None.
        advantages: ``[B, T]``, ``[B, 1]`` or ``[B]``.  response_mask: ``[B, T]`` bool (or 0/1).
        correction: the enabled corrections and their bounds (:class:`RolloutCorrection`; the weight
            ``w_t`` above uses its ``tis_cap``, ``seq_is_mask_*`` and ``icepop_*``); None: none.
        clip_ratio_low, clip_ratio_high, clip_ratio_c, loss_agg_mode, global_num_tokens,
        global_num_seqs: as in :func:`compute_policy_loss`.

    Returns:
        ``(loss, metrics)``: the metrics of :func:`compute_policy_loss` plus those of
        :func:`rollout_correction_weights` for the enabled rules.

    Raises:
        ValueError / TypeError: as :func:`compute_policy_loss` and :func:`rollout_correction_weights`.
    """
    weights, corr = None, {}
    if rollout_logprobs is not None:
        weights, corr = rollout_correction_weights(old_logprobs, rollout_logprobs, response_mask, correction)
        if correction is not None and correction.drops_masked_tokens:
            response_mask = rollout_correction_keep_mask(old_logprobs, rollout_logprobs, response_mask, correction)
    loss, metrics = compute_policy_loss(
        logprobs, old_logprobs, advantages, response_mask, clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c, loss_agg_mode=loss_agg_mode,
        global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs, rollout_is_weights=weights)
    metrics.update(corr)
    return loss, metrics

# --------------------------------------------------------------------------------------------
# KL and entropy
# --------------------------------------------------------------------------------------------
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimator of KL(pi_theta || pi_ref) from sampled-token log-probs.

    With ``d = logprobs - ref_logprobs`` (Schulman 2020, "Approximating KL divergence"):

    * ``"k1"`` (alias ``"kl"``): ``d`` -- unbiased, high variance, can be negative.
    * ``"k2"`` (alias ``"mse"``): ``0.5 * d**2``.
    * ``"k3"`` (alias ``"low_var_kl"``): ``exp(-d) + d - 1`` -- unbiased, non-negative, low variance.
      As in verl, the log-ratio ``-d`` is clamped to ``[-20, 20]`` before ``exp`` (overflow guard:
      an ``inf`` there would make the backward ``0 * inf = NaN``) and the estimate itself is clamped
      to ``[-10, 10]``.

    Args:
        logprobs, ref_logprobs: floating tensors of identical shape (any rank, usually ``[B, T]``).
        kind: estimator name (see above).

    Returns:
        Tensor of the input shape; aggregate it with :func:`agg_loss`.

    Raises:
        ValueError: unknown ``kind`` (named) or shape mismatch.  TypeError: non-floating input.
    """
    _check_float(logprobs, "logprobs")
    _check_float(ref_logprobs, "ref_logprobs")
    _check_shape(ref_logprobs, "ref_logprobs", tuple(logprobs.shape), "logprobs")
    canonical = KL_PENALTY_KINDS.get(kind)
    if canonical is None:
        raise ValueError(f"unknown KL penalty kind {kind!r}; expected one of {sorted(KL_PENALTY_KINDS)}")
    ref = ref_logprobs.detach().to(logprobs.dtype)
    diff = logprobs - ref
    if canonical == "k1":
        return diff
    if canonical == "k2":
        return 0.5 * diff.square()
    log_ratio = (-diff).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    k3 = torch.exp(log_ratio) - log_ratio - 1.0
    return k3.clamp(-_K3_VALUE_CLAMP, _K3_VALUE_CLAMP)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``H = logsumexp(z) - sum softmax(z) * z`` of categorical logits ``[..., V]`` -> ``[...]``.

    Numerically stable for large logits (logsumexp), and gradient-safe with ``-inf`` logits
    (e.g. a vocabulary mask): those entries contribute exactly 0 to value and gradient.
    fp16/bf16 inputs are computed and returned in float32; otherwise the input dtype is kept.

    Raises:
        TypeError: non-floating input.  ValueError: 0-dim input or empty vocabulary.
    """
    _check_float(logits, "logits")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dim, got {tuple(logits.shape)}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    finite = torch.isfinite(logits)
    safe_logits = torch.where(finite, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    lse = torch.logsumexp(logits, dim=-1)
    return lse - (probs * safe_logits).sum(dim=-1)
