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


def _shifted_logits(h, w, vocab_start, true_vocab, inv_temp, group):
    """``z - max(z)`` of one chunk (fp32, padded columns cut off) and the global row max.

    Returns ``(zs [c, n_valid], zmax [c], n_valid)``; ``zs`` is the only ``[c, V]`` buffer allocated here.
    """
    z = torch.matmul(h.float(), w.float().t())  # [c, Vl]
    n_valid = max(0, min(z.shape[1], true_vocab - vocab_start))
    zs = z[:, :n_valid]
    if inv_temp != 1.0:
        zs.mul_(inv_temp)
    zmax = zs.max(dim=1).values if n_valid else torch.full((z.shape[0],), float("-inf"), device=z.device)
    _all_reduce(zmax, dist.ReduceOp.MAX, group)
    zs.sub_(zmax[:, None])
    return zs, zmax, n_valid


def _target_shifted(zs, tgt, vocab_start, n_valid):
    local = (tgt >= vocab_start) & (tgt < vocab_start + n_valid)
    idx = torch.where(local, tgt - vocab_start, torch.zeros_like(tgt))
    val = zs.gather(1, idx[:, None]).squeeze(1) if n_valid else torch.zeros_like(tgt, dtype=zs.dtype)
    return torch.where(local, val, torch.zeros_like(val)), local, idx


def _chunk_stats(h, w, tgt, vocab_start, true_vocab, inv_temp, group):
    """Shifted logits plus the global ``log Σ exp(zs)``, shifted target logit and ``E_p[zs]`` of a chunk.

    Memory: two ``[c, V_local]`` fp32 buffers at most (the logits and their exponentials).
    """
    zs, zmax, n_valid = _shifted_logits(h, w, vocab_start, true_vocab, inv_temp, group)
    tlogit, local, idx = _target_shifted(zs, tgt, vocab_start, n_valid)
    e = torch.exp(zs)
    sumexp = e.sum(dim=1)
    ez_num = e.mul_(zs).sum(dim=1)  # reuse e's storage
    del e
    stacked = torch.stack([sumexp, tlogit, ez_num])
    _all_reduce(stacked, dist.ReduceOp.SUM, group)
    sumexp, tlogit, ez_num = stacked
    log_se = torch.log(sumexp)
    return zs, n_valid, local, idx, log_se, tlogit, ez_num / sumexp


class _ChunkedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, true_vocab, inv_temp, chunk, group, reduce_grad_hidden):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            zs, _, _, _, log_se, tlogit, ez = _chunk_stats(hidden[s:e], weight, targets[s:e], vocab_start,
                                                           true_vocab, inv_temp, group)
            del zs
            logp[s:e] = tlogit - log_se   # shifts cancel: (z_t - m) - (lse - m)
            ent[s:e] = log_se - ez        # H = lse - E[z] = log Σ exp(zs) - E[zs]
        ctx.save_for_backward(hidden, weight, targets)
        ctx.cfg = (vocab_start, true_vocab, inv_temp, chunk, group, reduce_grad_hidden)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets = ctx.saved_tensors
        vocab_start, true_vocab, inv_temp, chunk, group, reduce_grad_hidden = ctx.cfg
        n = hidden.shape[0]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        g_logp = g_logp if g_logp is not None else torch.zeros(n, device=hidden.device)
        g_ent = g_ent if g_ent is not None else torch.zeros(n, device=hidden.device)
        wf = weight.float()
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            h = hidden[s:e].float()
            zs, n_valid, local, idx, log_se, _, ez = _chunk_stats(h, weight, targets[s:e], vocab_start,
                                                                  true_vocab, inv_temp, group)
            if n_valid == 0:
                continue
            gl, ge = g_logp[s:e, None], g_ent[s:e, None]
            p = torch.exp(zs - log_se[:, None])                  # softmax (second [c, V] buffer)
            # dL/dz = gl * (onehot - p) - ge * p * (z - E[z])  =  -p * (gl + ge * (zs - E[zs])) + gl * onehot
            zs.sub_(ez[:, None]).mul_(ge).add_(gl)               # zs now holds gl + ge * (zs - E[zs])
            gz = p.mul_(zs).neg_()
            del zs
            rows = torch.nonzero(local).squeeze(1)
            gz[rows, idx[rows]] += g_logp[s:e][rows]
            if inv_temp != 1.0:
                gz.mul_(inv_temp)
            grad_h[s:e] = gz @ wf[:n_valid]
            grad_w[:n_valid] += gz.t() @ h
        # every TP rank contributes its vocabulary slice's part of dL/dh (unless a sequence-parallel gather's
        # backward reduce-scatters it instead)
        if reduce_grad_hidden:
            _all_reduce(grad_h, dist.ReduceOp.SUM, group)
        return (grad_h.to(hidden.dtype), grad_w.to(weight.dtype), None, None, None, None, None, None, None)


def vocab_parallel_logprobs_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                    vocab_start: int = 0, true_vocab_size: Optional[int] = None,
                                    temperature: float = 1.0, chunk_size: int = 1024,
                                    tp_group=None, reduce_grad_hidden: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
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
        reduce_grad_hidden: all-reduce ``dL/dhidden`` over ``tp_group`` in backward (``False`` when the caller's
            sequence-parallel gather reduce-scatters it).

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
                                        1.0 / float(temperature), int(chunk_size), tp_group, bool(reduce_grad_hidden))


def naive_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Reference: full-logits ``log_softmax`` (materialises ``[N, V]``); for tests and benchmarks."""
    z = logits.float() / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent
