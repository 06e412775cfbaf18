"""Each data-parallel rank receives only its share of a step's batch.

Rank 0 builds the step's rows (:class:`~megatron_dapo.batch.FlatBatch`) and decides, once, which
rows every DP rank trains on (:func:`plan_step`): the mini-batch permutation of every PPO epoch and, inside
each mini-batch, the token-balanced split over DP ranks (:func:`~megatron_dapo.actor.batching.balance_across_ranks`)
-- the same rows, in the same order, as the actor picks itself from a full batch, so the micro-batches,
the losses and the gradients are the same. Each DP rank then receives only the rows it needs as flat
token tensors + offsets (:func:`dispatch`, ``torch.distributed.broadcast`` inside a group of rank 0 and the
ranks of that DP rank: its TP/PP peers get the same shard), pads them locally and runs the actor in local
mode (``compute_logprobs(..., local=True)`` / ``train_step(..., local=True)``) with the mini-batch's global
token and sequence counts, which keep the token-mean (DAPO eq. 12) normalised over the whole mini-batch.

Memory: the full batch (on rank 0) is flat and unpadded; a DP rank holds about ``1/DP`` of the rows
(with ``ppo_epochs == 1``; each further epoch re-permutes, so a rank holds the union of its rows over
the epochs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..batch import FlatBatch
from ..sync.collective import collective_timeout
from .batching import balance_across_ranks

__all__ = ["LocalUpdate", "StepPlan", "LocalShard", "plan_step", "shard_for", "Dispatcher"]


@dataclass(frozen=True)
class LocalUpdate:
    """One optimizer update as seen by one DP rank.

    Attributes:
        rows: indices into the rank's :class:`LocalShard` rows, in the order the actor trains them.
        num_tokens: loss tokens of the whole mini-batch over all DP ranks (token-mean denominator).
        num_seqs: sequences with at least one loss token in the whole mini-batch (seq-mean denominator).
    """

    rows: tuple[int, ...]
    num_tokens: int
    num_seqs: int


@dataclass(frozen=True)
class StepPlan:
    """Rank 0's assignment of one step's rows to DP ranks.

    Attributes:
        rank_rows: per DP rank, the global rows it holds (ascending).
        updates: per update (epoch-major, then mini-batch), per DP rank, a :class:`LocalUpdate` indexing
            into that rank's ``rank_rows``.
        owned: per DP rank, bool ``[len(rank_rows[d])]``: the rank trains the row in the first epoch; every
            row is owned by exactly one DP rank (for metrics that must count each row once).
    """

    rank_rows: list[list[int]]
    updates: list[list[LocalUpdate]]
    owned: list[torch.Tensor]


@dataclass
class LocalShard:
    """What one rank holds for a step: its rows, its updates and which rows it counts in metrics."""

    batch: FlatBatch
    updates: list[LocalUpdate]
    owned: torch.Tensor


def plan_step(flat: FlatBatch, *, mini_batch_size: int, ppo_epochs: int, dp_size: int,
              generator: torch.Generator) -> StepPlan:
    """Assign the rows of ``flat`` to DP ranks for every update of the step.

    For each epoch ``perm = torch.randperm(N, generator=generator)``; mini-batch ``k`` is
    ``perm[k*B:(k+1)*B]`` (``B = mini_batch_size``); its rows are split by token count with
    :func:`balance_across_ranks` (the actor's own rule), each DP rank's rows kept in mini-batch order.

    Raises:
        ValueError: a mini-batch with fewer rows than DP ranks (from :func:`balance_across_ranks`),
            ``mini_batch_size``/``ppo_epochs``/``dp_size`` < 1.
    """
    for name, v in (("mini_batch_size", mini_batch_size), ("ppo_epochs", ppo_epochs), ("dp_size", dp_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    n = len(flat)
    lengths = flat.lengths.tolist()
    tok = flat.loss_token_counts().tolist()
    global_updates: list[tuple[list[list[int]], int, int]] = []
    owned_rows: list[set[int]] = [set() for _ in range(dp_size)]
    for epoch in range(ppo_epochs):
        perm = torch.randperm(n, generator=generator).tolist()
        for s in range(0, n, mini_batch_size):
            mb = perm[s: s + mini_batch_size]
            split = balance_across_ranks([lengths[i] for i in mb], dp_size)
            per_rank = [[mb[j] for j in part] for part in split]
            if epoch == 0:
                for d, rows in enumerate(per_rank):
                    owned_rows[d].update(rows)
            global_updates.append((per_rank, sum(tok[i] for i in mb), sum(1 for i in mb if tok[i] > 0)))
    rank_rows = [sorted({i for per_rank, _, _ in global_updates for i in per_rank[d]}) for d in range(dp_size)]
    where = [{g: k for k, g in enumerate(rows)} for rows in rank_rows]
    updates = [[LocalUpdate(tuple(where[d][i] for i in per_rank[d]), n_tok, n_seq) for d in range(dp_size)]
               for per_rank, n_tok, n_seq in global_updates]
    owned = [torch.tensor([g in owned_rows[d] for g in rank_rows[d]], dtype=torch.bool) for d in range(dp_size)]
    return StepPlan(rank_rows=rank_rows, updates=updates, owned=owned)


def shard_for(flat: FlatBatch, plan: StepPlan, dp_rank: int) -> LocalShard:
    """DP rank ``dp_rank``'s :class:`LocalShard` of ``flat`` under ``plan`` (no communication)."""
    return LocalShard(batch=flat.select(plan.rank_rows[dp_rank]), updates=[u[dp_rank] for u in plan.updates],
                      owned=plan.owned[dp_rank].clone())


# ------------------------------------------------------------------------------------------ wire format
_INT_HEADER = 6  # n_rows, n_tokens, has_rollout, n_updates, n_update_rows, has_token_mask


def _pack(shard: LocalShard) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(header int64 [6], ints int64, floats float32) of a shard."""
    b = shard.batch
    ups = shard.updates
    upd_rows = torch.tensor([r for u in ups for r in u.rows], dtype=torch.long)
    meta = torch.tensor([[len(u.rows), u.num_tokens, u.num_seqs] for u in ups], dtype=torch.long).reshape(-1)
    ints = torch.cat([b.tokens, b.offsets, b.prompt_lengths, meta, upd_rows, shard.owned.to(torch.long)])
    floats = [b.advantages, b.loss_weights] + [t for t in (b.rollout_logprobs, b.token_mask) if t is not None]
    header = torch.tensor([len(b), int(b.offsets[-1]), int(b.rollout_logprobs is not None), len(ups),
                           len(upd_rows), int(b.token_mask is not None)], dtype=torch.long)
    return header, ints, torch.cat(floats).to(torch.float32)


def _unpack(header: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor) -> LocalShard:
    """The shard packed by :func:`_pack`; its tensors are views of ``ints`` / ``floats`` (no copy)."""
    n, t, has_rl, n_up, n_up_rows, has_tm = (int(v) for v in header.tolist())
    sizes = [t, n + 1, n, 3 * n_up, n_up_rows, n]
    tokens, offsets, prompt_lengths, meta, upd_rows, owned = torch.split(ints, sizes)
    adv, weights, *rest = torch.split(floats, [n, n] + [t] * (has_rl + has_tm))
    meta = meta.reshape(n_up, 3).tolist()
    flat_rows = upd_rows.tolist()
    updates, k = [], 0
    for size, n_tok, n_seq in meta:
        updates.append(LocalUpdate(tuple(flat_rows[k: k + size]), n_tok, n_seq))
        k += size
    batch = FlatBatch(tokens=tokens, offsets=offsets, prompt_lengths=prompt_lengths, advantages=adv,
                      loss_weights=weights, rollout_logprobs=rest[0] if has_rl else None,
                      token_mask=rest[-1] if has_tm else None)
    return LocalShard(batch=batch, updates=updates, owned=owned.to(torch.bool))


class Dispatcher:
    """Sends each DP rank its :class:`LocalShard` (collective over every rank of the default group).

    Args:
        dp_rank: this process's data-parallel rank.
        dp_size: number of data-parallel ranks.
        device: where tensors travel (``cuda`` with NCCL; CPU with gloo).

    Construction is collective (one ``all_gather`` and one ``new_group`` per DP rank): every rank must
    build its dispatcher at the same point.
    """

    def __init__(self, dp_rank: int, dp_size: int, device: Optional[torch.device] = None):
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.device = device or torch.device("cpu")
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.groups: list[Optional[dist.ProcessGroup]] = [None] * dp_size
        self.members: list[list[int]] = [[0]] * dp_size
        if not self.distributed:
            return
        mine = torch.tensor([dp_rank], dtype=torch.long, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        dp_of = [int(t.item()) for t in every]
        for d in range(dp_size):
            members = sorted({0} | {r for r, x in enumerate(dp_of) if x == d})
            self.members[d] = members
            # collective: every rank creates every group
            group = dist.new_group(members, timeout=collective_timeout())
            if self.rank in members:
                self.groups[d] = group
        first = {d: min(r for r, x in enumerate(dp_of) if x == d) for d in range(dp_size)}
        self.counts_metrics = first[dp_rank] == self.rank
        """True on one rank per DP rank: add this rank's metric sums in world all-reduces."""

    def dispatch(self, flat: Optional[FlatBatch], plan: Optional[StepPlan]) -> LocalShard:
        """This rank's shard. ``flat`` and ``plan`` are read on rank 0 only (None elsewhere).

        Rank 0 packs one DP rank's shard at a time (its peak is the flat batch plus one packed shard;
        its own shard is a view of its packed buffers) and broadcasts it in that DP rank's group; a rank
        receives only its own shard.
        """
        if not self.distributed:
            return shard_for(flat, plan, 0)
        mine: Optional[LocalShard] = None
        for d in range(self.dp_size):
            group = self.groups[d]
            if self.rank == 0:
                header, ints, floats = _pack(shard_for(flat, plan, d))
                if d == self.dp_rank:
                    mine = _unpack(header, ints, floats)
                if len(self.members[d]) == 1:
                    continue
            elif group is None:
                continue
            else:
                header = torch.zeros(_INT_HEADER, dtype=torch.long)
            header = header.to(self.device)
            dist.broadcast(header, src=0, group=group)
            if self.rank != 0:
                n, t, has_rl, n_up, n_up_rows, has_tm = (int(v) for v in header.tolist())
                ints = torch.empty(t + (n + 1) + n + 3 * n_up + n_up_rows + n, dtype=torch.long)
                floats = torch.empty(2 * n + t * (has_rl + has_tm), dtype=torch.float32)
            ints, floats = ints.to(self.device), floats.to(self.device)
            dist.broadcast(ints, src=0, group=group)
            dist.broadcast(floats, src=0, group=group)
            if self.rank != 0:
                mine = _unpack(header.cpu(), ints.cpu(), floats.cpu())
            del header, ints, floats
        assert mine is not None
        return mine

    def sum_over_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of ``values`` (float64 ``[k]``, computed over this rank's owned rows) over all DP ranks,
        the same on every rank (one world ``all_reduce``; TP/PP peers add nothing twice)."""
        if not self.distributed:
            return values
        t = (values if self.counts_metrics else torch.zeros_like(values)).to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    def max_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise max of ``values`` over every rank (one world ``all_reduce``)."""
        if not self.distributed:
            return values
        t = values.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu()
