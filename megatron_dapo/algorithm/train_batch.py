"""Groups of sampled responses -> the actor's training rows (pure torch; DAPO arXiv 2503.14476).

:func:`flatten_groups` turns the step's groups (after dynamic sampling, eq. 11) into a
:class:`~megatron_dapo.batch.FlatBatch`:

* advantages (eq. 9): ``A_{i,t} = (R_i - mean({R_j})) / std({R_j})`` over the ``G`` responses of a
  prompt, the same for every token ``t`` of response ``i``
  (:func:`~megatron_dapo.algorithm.advantages.compute_group_advantages`; ``norm_adv_by_std=False`` drops
  the division, Dr. GRPO);
* the loss mask: "Overlong Filtering" (Sec. 3.4) masks truncated responses (``finish_reason ==
  "length"``) out of the loss (:func:`~megatron_dapo.algorithm.reward_shaping.overlong_filter_mask`); an
  empty response has no token to train on;
* the engine's log-probs of the sampled tokens (the behaviour corrections of
  :mod:`~megatron_dapo.algorithm.corrections` and the train/rollout mismatch metric), when every response
  has them; with ``require_rollout_logprobs`` a group without them is an error
  (:class:`MissingRolloutLogprobsError`), never a step that silently trains uncorrected.

:func:`build_train_batch` pads that into the :class:`~megatron_dapo.batch.ActorBatch` the actor
trains on (advantages broadcast per token). :func:`logprob_mismatch_parts` gives the additive pieces of
the train/rollout mismatch metric (:mod:`megatron_dapo.sync.metrics`) so data-parallel ranks holding
different rows can combine them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..batch import ActorBatch, FlatBatch
from ..errors import MegatronDapoError
from .advantages import compute_group_advantages
from .dynamic_sampling import Group
from .presets import AlgorithmSwitches
from .reward_shaping import overlong_filter_mask

__all__ = ["MissingRolloutLogprobsError", "build_train_batch", "flatten_groups", "logprob_mismatch_parts"]


class MissingRolloutLogprobsError(MegatronDapoError, ValueError):
    """A behaviour correction is configured but a group of the step has no engine log-probs
    (``Group.rollout_logprobs is None``): training it would drop the correction for the whole batch. The
    message names the group's ``prompt_index`` and how many groups lack them."""


def flatten_groups(groups: Sequence[Group], switches: AlgorithmSwitches, *,
                   require_rollout_logprobs: bool = False) -> FlatBatch:
    """The training rows of ``groups``: response ``j`` of group ``g`` is row ``g * G + j``.

    Args:
        groups: the step's groups, each with ``G`` responses (the same ``G`` for all groups).
        switches: reads ``norm_adv_by_std`` and ``overlong_filtering``.
        require_rollout_logprobs: True when a behaviour correction is on (the trainer passes
            ``RolloutCorrection.enabled``): then every group must carry its engine log-probs.

    Returns:
        A :class:`FlatBatch` with ``N = len(groups) * G`` rows: ``advantages`` float32 ``[N]`` (eq. 9),
        ``loss_weights`` float32 ``[N]`` (0 for truncated responses under overlong filtering and for empty
        responses), ``rollout_logprobs`` float32 ``[T]`` (0 on prompt tokens) when every group carries them,
        else None.

    Raises:
        ValueError: no groups, groups of different sizes, or an empty prompt (the group is named).
        NonFiniteAdvantageError: non-finite rewards (from :func:`compute_group_advantages`).
        MissingRolloutLogprobsError: ``require_rollout_logprobs`` and a group without engine log-probs.
    """
    if not groups:
        raise ValueError("no groups to train on")
    sizes = {len(g.responses) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"groups must all have the same number of responses, got sizes {sorted(sizes)}")
    for g in groups:
        if not g.prompt_ids:
            raise ValueError(f"group of prompt_index {g.prompt_index}: empty prompt")
    lacking = [g.prompt_index for g in groups if g.rollout_logprobs is None]
    if require_rollout_logprobs and lacking:
        raise MissingRolloutLogprobsError(
            f"group of prompt_index {lacking[0]} ({len(lacking)} of {len(groups)} groups) has no engine "
            "log-probs (rollout_logprobs), but a behaviour correction is configured (algorithm.tis_cap, "
            "icepop_low/high or seq_is_mask_low/high): the engine must return output_token_logprobs for every "
            "response")
    rewards = torch.tensor([list(g.rewards) for g in groups], dtype=torch.float32)
    adv = compute_group_advantages(rewards, norm_by_std=switches.norm_adv_by_std).reshape(-1).to(torch.float32)
    prompts = [g.prompt_ids for g in groups for _ in g.responses]
    responses = [r for g in groups for r in g.responses]
    weights = torch.tensor([1.0 if r else 0.0 for r in responses], dtype=torch.float32)
    if switches.overlong_filtering:
        weights = overlong_filter_mask([f for g in groups for f in g.finish_reasons], weights[:, None])[:, 0]
    lens = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)], dtype=torch.long)
    offsets = torch.zeros(len(lens) + 1, dtype=torch.long)
    torch.cumsum(lens, 0, out=offsets[1:])
    tokens = torch.tensor([t for p, r in zip(prompts, responses) for t in (*p, *r)], dtype=torch.long)
    rollout = None
    if not lacking:
        rollout = torch.tensor([v for p, lps in zip(prompts, (lp for g in groups for lp in g.rollout_logprobs))
                                for v in (*([0.0] * len(p)), *lps)], dtype=torch.float32)
    return FlatBatch(tokens=tokens, offsets=offsets,
                     prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long),
                     advantages=adv, loss_weights=weights, rollout_logprobs=rollout)


def build_train_batch(groups: Sequence[Group], switches: AlgorithmSwitches) -> ActorBatch:
    """``flatten_groups(groups, switches).to_actor_batch()``: the padded actor batch ``[N, L]`` with
    ``response_mask`` (overlong filtering applied), ``advantages`` (eq. 9 broadcast per token, zero outside
    the mask) and ``rollout_logprobs`` (or None). Raises as :func:`flatten_groups`."""
    return flatten_groups(groups, switches).to_actor_batch()


def logprob_mismatch_parts(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
    """``[sum, count, max]`` (float64 ``[3]``) of ``|old_logprobs - rollout_logprobs|`` over ``mask > 0``.

    Sums and counts add over data-parallel shards and maxima combine by ``max``; the mean is
    ``sum / count`` (the metric of :func:`megatron_dapo.sync.metrics.rollout_logprob_mismatch`, which this
    returns the pieces of). ``max`` is 0 without valid tokens. Shapes ``[N, L]``; raises ``ValueError`` as
    that function does.
    """
    # heavy: importing megatron_dapo.sync loads the weight-sync stack; the algorithm stays pure torch
    from ..sync.metrics import rollout_logprob_mismatch

    m = rollout_logprob_mismatch(old_logprobs, rollout_logprobs, mask)
    n = float((mask > 0).sum())
    return torch.tensor([m["rollout/train_rollout_logprob_abs_diff"] * n, n,
                         m["rollout/train_rollout_logprob_abs_diff_max"]], dtype=torch.float64)
