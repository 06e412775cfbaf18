"""Train/rollout log-probability mismatch metric (pure torch).

After a weight sync the rollout engine and the trainer should assign the same log-probabilities to
the sampled tokens; kernels, dtypes (bf16 engine vs fp32 trainer) and stale weights make them differ.
The mean absolute gap over response tokens is the standard health signal for the sync and for
truncated importance sampling (Yao et al., "Your Efficient RL Framework Secretly Brings You
Off-Policy RL Training", 2025).
"""
from __future__ import annotations

import torch


def rollout_logprob_mismatch(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                             mask: torch.Tensor) -> dict[str, float]:
    """Mean and max ``|old_logprobs - rollout_logprobs|`` over valid tokens.

    Args:
        old_logprobs: ``[N, L]`` trainer log-probs of the sampled tokens (any float dtype; computed in fp32).
        rollout_logprobs: ``[N, L]`` the engine's log-probs of the same tokens.
        mask: ``[N, L]`` 1 for valid (response) tokens, 0 elsewhere (bool or float; entries are
            treated as ``mask > 0``).

    Returns:
        ``{"rollout/train_rollout_logprob_abs_diff": mean, "rollout/train_rollout_logprob_abs_diff_max":
        max}`` (nats); both ``0.0`` when there is no valid token.

    Raises:
        ValueError: shape mismatch (names the argument) or a non-finite value at a valid token.
    """
    for name, t in (("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if old_logprobs.shape != rollout_logprobs.shape or old_logprobs.shape != mask.shape:
        raise ValueError(f"shape mismatch: old_logprobs {tuple(old_logprobs.shape)}, rollout_logprobs "
                         f"{tuple(rollout_logprobs.shape)}, mask {tuple(mask.shape)}")
    valid = mask > 0
    n = int(valid.sum())
    if n == 0:
        return {"rollout/train_rollout_logprob_abs_diff": 0.0, "rollout/train_rollout_logprob_abs_diff_max": 0.0}
    diff = (old_logprobs.float() - rollout_logprobs.float()).abs()[valid]
    if not torch.isfinite(diff).all():
        bad = valid.nonzero()[(~torch.isfinite(diff)).nonzero()[0, 0]].tolist()
        raise ValueError(f"non-finite logprob difference at valid token [row, col] = {bad}")
    return {"rollout/train_rollout_logprob_abs_diff": float(diff.sum() / n),
            "rollout/train_rollout_logprob_abs_diff_max": float(diff.max())}
