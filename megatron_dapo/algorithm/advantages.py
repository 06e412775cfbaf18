"""Group-relative advantage estimation (GRPO / DAPO, pure torch)."""
from __future__ import annotations

import torch

from ..errors import MegatronDapoError

__all__ = ["NonFiniteAdvantageError", "compute_group_advantages"]


class NonFiniteAdvantageError(MegatronDapoError, ValueError):
    """NaN/inf in rewards or advantages: a bug in reward shaping or advantage estimation (the rules
    produce finite numbers by construction). The message names the group (row of ``rewards``) and its values."""


def _first_bad_row(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t).all(dim=-1)).nonzero()[0, 0])


def compute_group_advantages(
    rewards: torch.Tensor, norm_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages, one value per response (DAPO eq. 9 / GRPO outcome supervision).

    For each group (the ``G`` responses sampled for one prompt)::

        A_i = (R_i - mean(R)) / (std(R) + eps)     if norm_by_std      (GRPO, DAPO)
        A_i =  R_i - mean(R)                       otherwise           (Dr. GRPO, arXiv 2503.20783)

    ``std`` is ``torch.std`` (Bessel-corrected, ``correction=1``), matching verl.  A group whose
    rewards are all identical -- including every group when ``G == 1`` -- gets exactly zero
    advantages (never NaN), since it carries no learning signal.

    Args:
        rewards: ``[num_groups, G]`` tensor of scalar rewards.  Floating dtypes are kept; bool/int
            rewards are converted to float32.
        norm_by_std: divide by the group standard deviation.
        eps: positive stabiliser added to the standard deviation.

    Returns:
        ``[num_groups, G]`` advantages with the (floating) dtype of ``rewards``.  Broadcast them per
        token with ``advantages[:, None]`` after flattening groups to sequences.

    Raises:
        TypeError: ``rewards`` is not a tensor.
        ValueError: ``rewards`` is not 2-D, is empty, or ``eps`` is not positive.
        NonFiniteAdvantageError: NaN/inf in ``rewards`` or in the computed advantages (the first bad
            group is named; a bug, see the class).
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor [num_groups, G], got {type(rewards).__name__}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be 2-D [num_groups, G], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] == 0:
        raise ValueError("rewards has G == 0 responses per group")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.float32)
    if not bool(torch.isfinite(rewards).all()):
        g = _first_bad_row(rewards)
        raise NonFiniteAdvantageError(f"bug: rewards of group {g} (row {g} of rewards) contain NaN/inf: "
                                      f"{rewards[g].tolist()}; the reward rules and shaping must give finite values")
    rewards = rewards.detach()
    num_groups, group_size = rewards.shape
    if num_groups == 0:
        return rewards.clone()

    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if norm_by_std:
        if group_size > 1:
            std = rewards.std(dim=-1, keepdim=True)
        else:
            std = torch.zeros_like(rewards)
        adv = centred / (std + eps)
    else:
        adv = centred
    # Identical rewards: force exact zeros (the mean may differ from the values by one ulp).
    constant = (rewards == rewards[:, :1]).all(dim=-1, keepdim=True)
    adv = torch.where(constant, torch.zeros((), dtype=adv.dtype), adv)
    if not bool(torch.isfinite(adv).all()):  # e.g. rewards so large that their spread overflows
        g = _first_bad_row(adv)
        raise NonFiniteAdvantageError(f"bug: advantages of group {g} are NaN/inf ({adv[g].tolist()}) for finite "
                                      f"rewards {rewards[g].tolist()}")
    return adv
