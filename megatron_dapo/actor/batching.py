"""Batches for the actor: padded token tensors, DP balancing and token-budget micro-batching."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class ActorBatch:
    """Sequences ``prompt + response`` right-padded to a common length ``L``.

    Per-token tensors are aligned with ``input_ids``: entry ``[i, j]`` concerns token ``j`` predicted
    from tokens ``< j`` (entry 0 is never a response token).

    Attributes:
        input_ids: int64 ``[N, L]`` (padding value irrelevant; masked everywhere).
        seq_lengths: int64 ``[N]`` valid tokens per row (prompt + response).
        response_mask: float32 ``[N, L]``, 1 on response tokens that enter the loss.
        old_logprobs: float32 ``[N, L]`` log π_old of each token (training only).
        advantages: float32 ``[N, L]`` per-token advantages (training only).
        rollout_logprobs: float32 ``[N, L]`` engine log-probs (truncated importance sampling), optional.
        ref_logprobs: float32 ``[N, L]`` reference-policy log-probs (KL loss), optional.
    """

    input_ids: torch.Tensor
    seq_lengths: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    rollout_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, idx: list[int] | torch.Tensor, trim: bool = True) -> "ActorBatch":
        """Rows ``idx`` (in that order); with ``trim`` the padding is cut to the longest selected row."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        lens = self.seq_lengths[idx]
        L = int(lens.max()) if trim and len(idx) else self.input_ids.shape[1]

        def pick(t):
            return None if t is None else t[idx, :L].contiguous()

        return ActorBatch(input_ids=pick(self.input_ids), seq_lengths=lens.clone(),
                          response_mask=pick(self.response_mask), old_logprobs=pick(self.old_logprobs),
                          advantages=pick(self.advantages), rollout_logprobs=pick(self.rollout_logprobs),
                          ref_logprobs=pick(self.ref_logprobs))


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


def build_actor_batch(prompts: list[list[int]], responses: list[list[int]], *,
                      loss_mask: Optional[list[float]] = None) -> ActorBatch:
    """Concatenate prompt and response ids per row and build the response mask.

    ``loss_mask`` (one 0/1 value per row) zeroes whole rows (e.g. overlong filtering).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts vs {len(responses)} responses")
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    L = max(len(s) for s in seqs)
    n = len(seqs)
    ids = torch.zeros(n, L, dtype=torch.long)
    mask = torch.zeros(n, L, dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        s = seqs[i]
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        if len(p) == 0:
            raise ValueError(f"row {i}: empty prompt")
        mask[i, len(p): len(s)] = 1.0 if loss_mask is None else float(loss_mask[i])
    return ActorBatch(input_ids=ids, seq_lengths=torch.tensor([len(s) for s in seqs]), response_mask=mask)


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
