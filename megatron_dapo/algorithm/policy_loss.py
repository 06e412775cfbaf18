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
* :mod:`megatron_dapo.algorithm.corrections` -- the behaviour-policy corrections it applies (TIS, the
  sequence mask, IcePop; :class:`RolloutCorrection`).
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
from typing import Optional, Union

import torch

from .corrections import RolloutCorrection, rollout_correction_keep_mask, rollout_correction_weights
from .tensor_checks import LOG_RATIO_CLAMP, as_bool_mask, check_2d, check_float, check_shape

__all__ = [
    "LOSS_AGG_MODES",
    "KL_PENALTY_KINDS",
    "agg_loss",
    "compute_policy_loss",
    "compute_decoupled_policy_loss",
    "kl_penalty",
    "entropy_from_logits",
]

#: Loss aggregation modes understood by :func:`agg_loss`.
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

#: Canonical KL estimator names and their accepted aliases (verl spellings).
KL_PENALTY_KINDS = {
    "k1": "k1",
    "kl": "k1",
    "k2": "k2",
    "mse": "k2",
    "k3": "k3",
    "low_var_kl": "k3",
}

# verl clamps the k3 estimate itself to [-10, 10].
_K3_VALUE_CLAMP = 10.0

CountLike = Union[int, float, torch.Tensor, None]


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
    check_float(values, "values")
    check_2d(values, "values")
    mask = as_bool_mask(mask, "mask")
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
        check_float(t, name)
    check_2d(logprobs, "logprobs")
    shape = tuple(logprobs.shape)
    check_shape(old_logprobs, "old_logprobs", shape, "logprobs")
    mask = as_bool_mask(response_mask, "response_mask")
    check_shape(mask, "response_mask", shape, "logprobs")
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
        check_float(rollout_is_weights, "rollout_is_weights")
        check_shape(rollout_is_weights, "rollout_is_weights", shape, "logprobs")

    dtype, device = logprobs.dtype, logprobs.device
    zero = torch.zeros((), dtype=dtype, device=device)
    # The only path from the loss back to `logprobs` runs through this where(): masked NaN/inf in
    # logprobs/old_logprobs become an exact 0 log-ratio before exp(), and where()'s backward hands
    # masked positions an exact 0 gradient, whatever (even NaN) arrives from downstream.  Masked
    # NaN/inf in advantages or rollout_is_weights only reach the per-token loss at masked
    # positions, which the aggregation drops with a second where().
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach().to(dtype), zero)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
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
    check_float(logprobs, "logprobs")
    check_float(ref_logprobs, "ref_logprobs")
    check_shape(ref_logprobs, "ref_logprobs", tuple(logprobs.shape), "logprobs")
    canonical = KL_PENALTY_KINDS.get(kind)
    if canonical is None:
        raise ValueError(f"unknown KL penalty kind {kind!r}; expected one of {sorted(KL_PENALTY_KINDS)}")
    ref = ref_logprobs.detach().to(logprobs.dtype)
    diff = logprobs - ref
    if canonical == "k1":
        return diff
    if canonical == "k2":
        return 0.5 * diff.square()
    log_ratio = (-diff).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
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
    check_float(logits, "logits")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dim, got {tuple(logits.shape)}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    finite = torch.isfinite(logits)
    safe_logits = torch.where(finite, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    lse = torch.logsumexp(logits, dim=-1)
    return lse - (probs * safe_logits).sum(dim=-1)
