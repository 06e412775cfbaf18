"""Input checks shared by the loss and the correction functions (pure torch; each raises naming the tensor).

* :func:`as_bool_mask` -- a ``response_mask`` as bool (non-bool masks must hold only 0 and 1).
* :func:`check_float`, :func:`check_2d`, :func:`check_shape` -- dtype, rank and shape checks.
* :data:`LOG_RATIO_CLAMP` -- the bound of every log-ratio before ``exp`` (as verl clamps it), so that ``exp`` never
  overflows and the backward pass never meets ``0 * inf``.
"""
from __future__ import annotations

import torch

__all__ = ["LOG_RATIO_CLAMP", "as_bool_mask", "check_2d", "check_float", "check_shape"]

LOG_RATIO_CLAMP = 20.0
"""``|log ratio|`` bound before ``exp`` (the PPO ratio and the importance weights)."""


def as_bool_mask(response_mask: torch.Tensor, name: str = "response_mask") -> torch.Tensor:
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


def check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_2d(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(t.shape)}")


def check_shape(t: torch.Tensor, name: str, shape: tuple[int, ...], ref_name: str) -> None:
    """Raise ``ValueError`` naming both tensors when ``t``'s shape is not ``shape`` (that of ``ref_name``)."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(t.shape)} != {ref_name} shape {tuple(shape)}")
