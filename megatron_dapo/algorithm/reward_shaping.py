"""DAPO reward shaping and sample filtering (pure torch).

* :func:`soft_overlong_penalty` -- "Soft Overlong Punishment", DAPO eq. 13.
* :func:`overlong_filter_mask` -- "Overlong Filtering": truncated samples are masked out of the loss.
* :func:`filter_groups` -- the dynamic-sampling constraint of DAPO eq. 11
  (``0 < |{o_i : is_equivalent(a, o_i)}| < G``).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["soft_overlong_penalty", "overlong_filter_mask", "filter_groups"]


def soft_overlong_penalty(
    response_lengths: Union[torch.Tensor, Sequence[int]],
    max_response_length: int,
    overlong_buffer_length: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """Length-aware penalty added to the rule-based reward (DAPO eq. 13).

    With ``L_max = max_response_length`` and ``L_cache = overlong_buffer_length``::

        R(y) = 0                                   if |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
             = -1                                  if |y| > L_max

    and the result is multiplied by ``penalty_factor``.  Example (L_max 16384, L_cache 4096):
    14336 tokens -> -0.5, 13000 -> -0.17383, 17000 -> -1.

    Note the paper's run uses an *expected* length of 16384 plus a 4096-token cache, i.e.
    ``max_response_length=20480, overlong_buffer_length=4096``.

    Args:
        response_lengths: ``[N]`` integer tensor (or sequence of ints) of response token counts.
        max_response_length: ``L_max`` (tokens, > 0).
        overlong_buffer_length: ``L_cache`` (tokens, ``0 < L_cache <= L_max``).
        penalty_factor: multiplier (>= 0) applied to the penalty.

    Returns:
        float32 ``[N]`` penalties in ``[-penalty_factor, 0]``.

    Raises:
        ValueError: invalid lengths (the first negative index is named) or parameters.
        TypeError: floating-point / non-integer lengths.
    """
    if not isinstance(response_lengths, torch.Tensor):
        response_lengths = torch.as_tensor(list(response_lengths), dtype=torch.int64)
    if response_lengths.dtype == torch.bool or response_lengths.is_floating_point() or response_lengths.is_complex():
        raise TypeError(f"response_lengths must be an integer tensor, got dtype {response_lengths.dtype}")
    if response_lengths.dim() != 1:
        raise ValueError(f"response_lengths must be 1-D [N], got shape {tuple(response_lengths.shape)}")
    if int(max_response_length) <= 0:
        raise ValueError(f"max_response_length must be > 0, got {max_response_length}")
    if not 0 < int(overlong_buffer_length) <= int(max_response_length):
        raise ValueError(
            f"overlong_buffer_length must be in (0, max_response_length={max_response_length}], "
            f"got {overlong_buffer_length}"
        )
    if not float(penalty_factor) >= 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    if response_lengths.numel() and bool((response_lengths < 0).any()):
        i = int((response_lengths < 0).nonzero()[0, 0])
        raise ValueError(f"response_lengths[{i}] = {int(response_lengths[i])} is negative")

    lengths = response_lengths.to(torch.float64)
    l_max = float(max_response_length)
    l_cache = float(overlong_buffer_length)
    expected = l_max - l_cache
    ramp = (expected - lengths) / l_cache
    penalty = torch.where(
        lengths <= expected,
        torch.zeros_like(lengths),
        torch.where(lengths <= l_max, ramp, torch.full_like(lengths, -1.0)),
    )
    return (penalty * float(penalty_factor)).to(torch.float32)


def overlong_filter_mask(
    truncated: Union[torch.Tensor, Sequence[str], Sequence[bool]],
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Zero the loss mask of truncated samples ("Overlong Filtering", DAPO Sec. 3.4).

    Args:
        truncated: bool tensor ``[B]`` (True = truncated), a list of bools, or a list of
            ``finish_reason`` strings where ``"length"`` means truncated (the SGLang/OpenAI
            convention; any other reason such as ``"stop"`` or ``"abort"`` is kept).
        response_mask: ``[B, T]`` mask (any dtype).

    Returns:
        A new tensor like ``response_mask`` (same dtype/device) with the truncated rows zeroed.

    Raises:
        ValueError: length of ``truncated`` differs from ``B``, or a list mixes types.
        TypeError: unsupported ``truncated`` element type or non-tensor ``response_mask``.
    """
    if not isinstance(response_mask, torch.Tensor):
        raise TypeError(f"response_mask must be a torch.Tensor, got {type(response_mask).__name__}")
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be 2-D [B, T], got shape {tuple(response_mask.shape)}")
    if isinstance(truncated, torch.Tensor):
        if truncated.dim() != 1:
            raise ValueError(f"truncated must be 1-D [B], got shape {tuple(truncated.shape)}")
        if truncated.dtype != torch.bool:
            raise TypeError(f"truncated tensor must be bool, got dtype {truncated.dtype}")
        flags = truncated.to(response_mask.device)
    else:
        items = list(truncated)
        values = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                values.append(item == "length")
            elif isinstance(item, bool):
                values.append(item)
            else:
                raise TypeError(
                    f"truncated[{i}] must be a finish_reason string or a bool, got {type(item).__name__}"
                )
        flags = torch.tensor(values, dtype=torch.bool, device=response_mask.device)
    if flags.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"truncated has {flags.shape[0]} entries but response_mask has {response_mask.shape[0]} rows"
        )
    zero = torch.zeros((), dtype=response_mask.dtype, device=response_mask.device)
    return torch.where(flags[:, None], zero, response_mask)


def filter_groups(correct: torch.Tensor) -> torch.Tensor:
    """Keep mask of DAPO dynamic sampling (eq. 11): groups neither all-correct nor all-wrong.

    Args:
        correct: bool ``[num_groups, G]`` (integer 0/1 also accepted).

    Returns:
        bool ``[num_groups]``, True where ``0 < #correct < G``.

    Raises:
        ValueError: not 2-D, or a non-bool tensor holds values other than 0/1.
        TypeError: not a tensor, or floating dtype.
    """
    if not isinstance(correct, torch.Tensor):
        raise TypeError(f"correct must be a bool tensor [num_groups, G], got {type(correct).__name__}")
    if correct.dim() != 2:
        raise ValueError(f"correct must be 2-D [num_groups, G], got shape {tuple(correct.shape)}")
    if correct.dtype != torch.bool:
        if correct.is_floating_point() or correct.is_complex():
            raise TypeError(f"correct must be bool (or integer 0/1), got dtype {correct.dtype}")
        if correct.numel() and not bool(((correct == 0) | (correct == 1)).all()):
            raise ValueError("correct must only hold 0/1 values")
        correct = correct != 0
    n_correct = correct.sum(dim=-1)
    return (n_correct > 0) & (n_correct < correct.shape[1])
