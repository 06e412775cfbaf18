"""Memory-lean, vocab-parallel token log-probabilities and entropy from final hidden states.

The LM head ``z = h Wᵀ / τ`` over a vocabulary of V = 152,064 rows would materialise a ``[T, V]`` fp32
tensor (20,480 × 152,064 × 4 B = 12.5 GB for one sequence), and autograd would keep it (and its softmax)
for backward. :func:`vocab_parallel_logprobs_entropy` instead processes ``chunk_size`` positions at a
time, keeps only ``[T]``-sized results for backward, and recomputes each chunk's logits in backward.
Peak extra memory is O(chunk_size × V / TP).

With tensor parallelism each rank holds a contiguous vocabulary slice ``W_r`` of ``[V/TP, H]``; the
softmax normaliser, the target logit and ``E[z]`` are combined with all-reduces over the TP group
(the same algebra as megatron-core's ``vocab_parallel_cross_entropy``). Padded vocabulary rows
(index ≥ ``true_vocab_size``) are excluded from the softmax, so results equal the HF model's.

Gradients (``p = softmax(z)``, ``t`` target): ``∂logp_t/∂z = onehot(t) − p`` and
``∂H/∂z = −p ⊙ (z − E_p[z])`` with ``H = logsumexp(z) − E_p[z]``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _chunk_stats(h: torch.Tensor, w: torch.Tensor, tgt: torch.Tensor, vocab_start: int, true_vocab: int,
                 inv_temp: float, group):
    """Logits of one chunk plus global logsumexp, target logit and E_p[z] (all fp32)."""
    z = (h.float() @ w.float().t()) * inv_temp  # [c, Vl]
    vl = z.shape[1]
    n_valid = max(0, min(vl, true_vocab - vocab_start))
    if n_valid < vl:
        z[:, n_valid:] = float("-inf")
    zmax = z.max(dim=1).values
    _all_reduce(zmax, dist.ReduceOp.MAX, group)
    e = torch.exp(z - zmax[:, None])
    sumexp = e.sum(dim=1)
    local = (tgt >= vocab_start) & (tgt < vocab_start + vl)
    idx = torch.where(local, tgt - vocab_start, torch.zeros_like(tgt))
    tlogit = torch.where(local, z.gather(1, idx[:, None]).squeeze(1), torch.zeros_like(zmax))
    zfin = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    ez_num = (e * zfin).sum(dim=1)
    stacked = torch.stack([sumexp, tlogit, ez_num])
    _all_reduce(stacked, dist.ReduceOp.SUM, group)
    sumexp, tlogit, ez_num = stacked
    lse = zmax + torch.log(sumexp)
    ez = ez_num / sumexp
    return z, zfin, lse, tlogit, ez


class _ChunkedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, true_vocab, inv_temp, chunk, group, need_entropy):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            _, _, lse, tlogit, ez = _chunk_stats(hidden[s:e], weight, targets[s:e], vocab_start, true_vocab,
                                                 inv_temp, group)
            logp[s:e] = tlogit - lse
            ent[s:e] = lse - ez
        ctx.save_for_backward(hidden, weight, targets)
        ctx.cfg = (vocab_start, true_vocab, inv_temp, chunk, group)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets = ctx.saved_tensors
        vocab_start, true_vocab, inv_temp, chunk, group = ctx.cfg
        n = hidden.shape[0]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        g_logp = g_logp if g_logp is not None else torch.zeros(n, device=hidden.device)
        g_ent = g_ent if g_ent is not None else torch.zeros(n, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            h = hidden[s:e]
            tgt = targets[s:e]
            z, zfin, lse, _, ez = _chunk_stats(h, weight, tgt, vocab_start, true_vocab, inv_temp, group)
            p = torch.exp(z - lse[:, None])  # padded rows: exp(-inf) = 0
            vl = z.shape[1]
            gz = -p * g_logp[s:e, None] - g_ent[s:e, None] * p * (zfin - ez[:, None])
            local = (tgt >= vocab_start) & (tgt < vocab_start + vl)
            rows = torch.nonzero(local).squeeze(1)
            gz[rows, tgt[rows] - vocab_start] += g_logp[s:e][rows]
            gz = gz * inv_temp
            grad_h[s:e] = gz @ weight.float()
            grad_w += gz.t() @ h.float()
        # every TP rank contributes its vocabulary slice's part of dL/dh
        _all_reduce(grad_h, dist.ReduceOp.SUM, group)
        return (grad_h.to(hidden.dtype), grad_w.to(weight.dtype), None, None, None, None, None, None, None)


def vocab_parallel_logprobs_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                    vocab_start: int = 0, true_vocab_size: Optional[int] = None,
                                    temperature: float = 1.0, chunk_size: int = 1024,
                                    tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position ``log p(target)`` and entropy of ``softmax(h Wᵀ / temperature)``.

    Args:
        hidden: ``[N, H]`` final hidden states (after the final norm), replicated across TP ranks; any
            float dtype (math in fp32).
        weight: ``[V_local, H]`` this rank's output-layer (or tied embedding) rows, global rows
            ``[vocab_start, vocab_start + V_local)``.
        targets: int64 ``[N]`` global token ids.
        true_vocab_size: rows at or beyond this index are padding and excluded (default: no padding).
        temperature: logits are divided by it (the rollout temperature, as in verl/SGLang).
        chunk_size: positions per chunk (bounds memory at ``chunk_size × V_local`` fp32).
        tp_group: the tensor-parallel process group (``None`` = no TP).

    Returns:
        ``(logprobs, entropy)``: fp32 ``[N]`` each, differentiable w.r.t. ``hidden`` and ``weight``.

    Raises:
        ValueError: shape mismatch or non-positive temperature/chunk size.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [N,H] and [V,H]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N] with N={hidden.shape[0]}")
    if temperature <= 0 or chunk_size <= 0:
        raise ValueError("temperature and chunk_size must be > 0")
    tv = true_vocab_size if true_vocab_size is not None else 1 << 62
    return _ChunkedLogprobEntropy.apply(hidden, weight, targets.long(), int(vocab_start), int(tv),
                                        1.0 / float(temperature), int(chunk_size), tp_group, True)


def naive_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Reference: full-logits ``log_softmax`` (materialises ``[N, V]``); for tests and benchmarks."""
    z = logits.float() / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent
