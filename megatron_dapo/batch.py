"""The batch types the trainer, the algorithm and the actor share (no Megatron, no I/O).

* :class:`FlatBatch` - training rows as flat token tensors plus offsets: what
  :func:`megatron_dapo.algorithm.train_batch.build_train_batch` builds and the trainer ranks exchange
  (:mod:`megatron_dapo.actor.dispatch`).
* :class:`ActorBatch` - the same rows right-padded to a common length: the actor's input.
* :func:`build_actor_batch` - an :class:`ActorBatch` from prompt and response token ids.

This module imports neither :mod:`megatron_dapo.actor` nor :mod:`megatron_dapo.algorithm`, so both can use it.
"""
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


@dataclass
class FlatBatch:
    """Training rows as flat token tensors + offsets (no padding): the wire format between the trainer
    ranks (:mod:`megatron_dapo.actor.dispatch`) and the input of :meth:`to_actor_batch`.

    Row ``i`` is ``tokens[offsets[i]:offsets[i + 1]]`` = prompt (``prompt_lengths[i]`` tokens) + response.

    Attributes:
        tokens: int64 ``[T]`` token ids of every row, concatenated (``T = offsets[-1]``).
        offsets: int64 ``[N + 1]`` row starts in ``tokens``; ``offsets[0] == 0``, non-decreasing.
        prompt_lengths: int64 ``[N]`` prompt tokens per row (>= 1).
        advantages: float32 ``[N]`` one advantage per response (DAPO eq. 9; the same for every token).
        loss_weights: float32 ``[N]`` 1 when the row's response tokens enter the loss, 0 when masked
            (overlong filtering, empty response).
        rollout_logprobs: float32 ``[T]`` the engine's log-prob of each response token (0 on prompt
            tokens), or None.
        token_mask: float32 ``[T]`` 1 on the response tokens that may enter the loss, 0 on prompt tokens and
            on response tokens left out (the off-policy prefix of a continued partial rollout,
            :func:`~megatron_dapo.algorithm.train_batch.offpolicy_prefix_mask`); None = every response token.
            A row's tokens enter the loss where ``loss_weights`` and ``token_mask`` are both non-zero.
    """

    tokens: torch.Tensor
    offsets: torch.Tensor
    prompt_lengths: torch.Tensor
    advantages: torch.Tensor
    loss_weights: torch.Tensor
    rollout_logprobs: Optional[torch.Tensor] = None
    token_mask: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.prompt_lengths.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """int64 ``[N]`` tokens per row (prompt + response)."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def response_lengths(self) -> torch.Tensor:
        """int64 ``[N]`` response tokens per row."""
        return self.lengths - self.prompt_lengths

    def loss_token_counts(self) -> torch.Tensor:
        """int64 ``[N]`` response tokens of each row that enter the loss (0 for a masked row; without the
        tokens that ``token_mask`` leaves out)."""
        counts = self.response_lengths
        if self.token_mask is not None:
            row_of = torch.repeat_interleave(torch.arange(len(self)), self.lengths)
            counts = torch.zeros(len(self), dtype=torch.long).index_add_(0, row_of, (self.token_mask > 0).long())
        return torch.where(self.loss_weights > 0, counts, torch.zeros_like(counts))

    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        ts = [self.tokens, self.offsets, self.prompt_lengths, self.advantages, self.loss_weights, self.rollout_logprobs,
              self.token_mask]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def select(self, rows: list[int] | torch.Tensor) -> "FlatBatch":
        """Rows ``rows`` (in that order) as a new flat batch."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        lens = self.lengths[rows]
        offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
        torch.cumsum(lens, 0, out=offsets[1:])
        # source index of every kept token: start of its row + position within the row
        row_of = torch.repeat_interleave(torch.arange(len(rows)), lens)
        src = self.offsets[rows][row_of] + torch.arange(int(offsets[-1])) - offsets[:-1][row_of]
        return FlatBatch(tokens=self.tokens[src], offsets=offsets, prompt_lengths=self.prompt_lengths[rows].clone(),
                         advantages=self.advantages[rows].clone(), loss_weights=self.loss_weights[rows].clone(),
                         rollout_logprobs=None if self.rollout_logprobs is None else self.rollout_logprobs[src],
                         token_mask=None if self.token_mask is None else self.token_mask[src])

    def to_actor_batch(self) -> ActorBatch:
        """The padded :class:`ActorBatch` (``L`` = longest row): ``response_mask[i, j] = loss_weights[i]`` on
        the response tokens (times ``token_mask`` when set), ``advantages[i, j] = advantages[i] *
        response_mask[i, j]`` (eq. 9 broadcast per token), ``rollout_logprobs`` placed at the response tokens
        (zero elsewhere).

        Raises:
            ValueError: no rows, or a row with an empty prompt.
        """
        n = len(self)
        if n == 0:
            raise ValueError("a batch needs at least one row")
        if bool((self.prompt_lengths < 1).any()):
            raise ValueError(f"row {int((self.prompt_lengths < 1).nonzero()[0, 0])}: empty prompt")
        lens = self.lengths
        L = int(lens.max())
        row_of = torch.repeat_interleave(torch.arange(n), lens)
        col = torch.arange(int(self.offsets[-1])) - self.offsets[:-1][row_of]
        ids = torch.zeros(n, L, dtype=torch.long)
        ids[row_of, col] = self.tokens
        is_resp = col >= self.prompt_lengths[row_of]
        mask = torch.zeros(n, L, dtype=torch.float32)
        keep = self.loss_weights[row_of] if self.token_mask is None else self.loss_weights[row_of] * self.token_mask
        mask[row_of, col] = torch.where(is_resp, keep, torch.zeros(()))
        batch = ActorBatch(input_ids=ids, seq_lengths=lens.clone(), response_mask=mask)
        batch.advantages = self.advantages.to(torch.float32).unsqueeze(1) * mask
        if self.rollout_logprobs is not None:
            rl = torch.zeros(n, L, dtype=torch.float32)
            rl[row_of, col] = torch.where(is_resp, self.rollout_logprobs.to(torch.float32), torch.zeros(()))
            batch.rollout_logprobs = rl
        return batch
