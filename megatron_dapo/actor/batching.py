"""Batches for the actor: column padding, DP balancing and token-budget micro-batching.

The batch types themselves (:class:`ActorBatch`, :class:`FlatBatch`, :func:`build_actor_batch`) are defined in
:mod:`megatron_dapo.batch`, which the algorithm shares without importing the actor; they are re-exported here.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..batch import ActorBatch, FlatBatch, build_actor_batch

__all__ = ["ActorBatch", "FlatBatch", "balance_across_ranks", "build_actor_batch", "make_micro_batches",
           "pad_columns"]


def pad_columns(batch: ActorBatch, multiple: int) -> ActorBatch:
    """``batch`` with its width ``L`` zero-padded (in place of the tensors) up to a multiple of ``multiple``.

    Sequence parallelism splits the sequence dimension over the TP ranks, so megatron-core needs ``L``
    divisible by TP. Padding columns follow every valid token and carry a zero response mask, so causal
    attention leaves the valid positions unchanged. Returns ``batch`` itself when nothing is needed.

    Raises:
        ValueError: ``multiple < 1``.
    """
    if multiple < 1:
        raise ValueError(f"pad multiple must be >= 1, got {multiple}")
    L = batch.input_ids.shape[1]
    extra = (-L) % multiple
    if extra == 0:
        return batch

    def pad(t):
        return None if t is None else torch.nn.functional.pad(t, (0, extra))

    for name in ("input_ids", "response_mask", "old_logprobs", "advantages", "rollout_logprobs", "ref_logprobs"):
        setattr(batch, name, pad(getattr(batch, name)))
    return batch


def balance_across_ranks(lengths: list[int], num_ranks: int) -> list[list[int]]:
    """Split row indices over ``num_ranks`` so token counts are balanced (longest-first greedy).

    Deterministic; every rank gets at least one row when ``len(lengths) >= num_ranks``.

    Raises:
        ValueError: fewer rows than ranks.
    """
    if len(lengths) < num_ranks:
        raise ValueError(f"{len(lengths)} sequences cannot be split over {num_ranks} data-parallel ranks")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    buckets: list[list[int]] = [[] for _ in range(num_ranks)]
    load = [0] * num_ranks
    for i in order:
        r = min(range(num_ranks), key=lambda k: (load[k], len(buckets[k]), k))
        buckets[r].append(i)
        load[r] += lengths[i]
    return [sorted(b) for b in buckets]


def make_micro_batches(lengths: list[int], max_tokens: int, micro_batch_size: Optional[int] = None) -> list[list[int]]:
    """Group row indices into micro-batches.

    With ``micro_batch_size`` fixed-size groups in order; otherwise rows sorted by length are packed so
    that ``rows × longest_row ≤ max_tokens`` (padded-batch cost; a row longer than the budget gets a
    micro-batch of its own).
    """
    n = len(lengths)
    if micro_batch_size:
        return [list(range(s, min(n, s + micro_batch_size))) for s in range(0, n, micro_batch_size)]
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and new_max * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, cur_max = [], 0
            new_max = lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        out.append(cur)
    return out
