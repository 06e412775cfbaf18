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

Tensor cores for 16-bit models (``tf32=True``, config ``actor.logprob_tf32``): see :func:`tf32_matmuls`.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch
import torch.distributed as dist

_TF32_LOCK = threading.RLock()
_HALF_DTYPES = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """Allow TF32 tensor-core cuBLAS matmuls inside the block only; restore both global flags afterwards.

    When TF32 is off (the default, precision ``"highest"``), sets ``torch.backends.cuda.matmul.allow_tf32 =
    True`` (which also moves ``torch.get_float32_matmul_precision()`` to ``"high"``) and restores
    ``allow_tf32 = False`` and the previous ``float32_matmul_precision`` on exit, also on an exception; when
    TF32 is already allowed it changes nothing. Only the legacy setter is used: on torch >= 2.9 it keeps the
    legacy and per-backend (``fp32_precision``) state consistent, which cuBLAS checks at every fp32 matmul.
    A module-level re-entrant lock is held for the block, so two threads running these matmuls cannot
    interleave save/restore (other code that flips the flags concurrently is not guarded; nothing in this
    project does). ``enabled=False`` is a no-op. CPU matmuls are unaffected (the flag is cuBLAS-only).

    Why it is used by :func:`vocab_parallel_logprobs_entropy` for bf16/fp16 models, and what it costs:

    * Forward / the logits recomputed in backward, ``z = h.float() @ w.float().T`` (``h [c, H]``,
      ``w [V_local, H]``, both upcast from bf16/fp16): TF32 keeps the fp32 exponent (8 bits) and 10 explicit
      mantissa bits = 11 significant bits (NVIDIA, "TensorFloat-32 in the A100 GPU", and the torch docs of
      ``allow_tf32``, "TensorFloat-32 (TF32) on Ampere (and later) devices": inputs are rounded to 10 mantissa
      bits, products are exact and accumulated in fp32). bf16 has 8 significant bits, fp16 11 (and a 5-bit
      exponent inside fp32's range), so the upcast operands are already TF32 values: rounding them is the
      identity, the products are exact, and the logits differ from the fp32 (SIMT) GEMM only by the fp32
      accumulation order, the same kind of difference as between two fp32 GEMM kernels. Measured on one H200
      (T=8192, H=1536, V=151,936, benchmarks/gpu/bench_logprob_tf32.py): log-probs differ by ≤ 9.5e-6 and
      entropies by ≤ 2.9e-6 (absolute; |log p| up to ~15) between TF32 and fp32 SIMT; against an fp64
      reference 9.5e-6 vs 1.9e-6, i.e. the tensor-core fp32 accumulation rounds a little more coarsely than
      the SIMT kernel, still ~1e-6 relative — far below the bf16 model's own rounding of ``h`` and ``w``.
    * Backward, ``dL/dh = gz @ w`` (``[c, V] × [V, H]``) and ``dL/dw += gzᵀ @ h`` (``[V, c] × [c, H]``): the
      fp32 logit gradient ``gz = dL/dz`` is *not* a TF32 value; rounding it to 11 significant bits gives a
      relative error ≤ u_tf32 = 2⁻¹¹ per element, so each output entry moves by at most
      ``2⁻¹¹ · Σ_k |gz_k| |w_k|`` beyond the fp32 result (``h``/``w`` stay exact). The gradients are then
      cast to the parameter dtype: for bf16 that rounding is ≤ 2⁻⁸ relative (u_bf16), i.e. the TF32 error is
      at most 1/8 of the bf16 output rounding whenever the sum does not cancel (``|Σ gz·w| ≈ Σ |gz||w|``),
      and bounded by the same ``2⁻¹¹ Σ|gz||w|`` as fp32 accumulation-order differences of that size when
      it does. For fp16 (u = 2⁻¹¹) the TF32 error is of the order of the final rounding. Hence TF32 is used
      for the backward GEMMs too. fp32 models never use TF32 (their gradients are not rounded afterwards).
      Measured (same run): the bf16 gradients differ by ≤ 3.2e-3 (dL/dh) and 4.1e-3 (dL/dW) of their max
      entry, ≈ 2⁻⁸, i.e. about one bf16 rounding step; relative Frobenius difference 1.0e-3–1.1e-3; 96% / 90%
      of the entries are bitwise equal.
    """
    if not enabled:
        yield
        return
    with _TF32_LOCK:
        try:
            already = torch.backends.cuda.matmul.allow_tf32
            old_prec = torch.get_float32_matmul_precision()
        except RuntimeError:
            # torch >= 2.9 raises when the legacy and the per-backend (``fp32_precision``) APIs were mixed so
            # that the backends disagree (e.g. precision "medium": cuBLAS tf32, mkldnn bf16): leave the
            # caller's settings alone and run the block as configured.
            already, old_prec = True, None
        if already:  # TF32 already allowed (precision "high"/"medium"), or unreadable: change nothing
            yield
            return
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
            if torch.get_float32_matmul_precision() != old_prec:
                torch.set_float32_matmul_precision(old_prec)


def _use_tf32(requested: bool, hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """TF32 only when asked, on CUDA, and when both ORIGINAL operands are 16-bit floats (exact in TF32)."""
    return (bool(requested) and hidden.is_cuda and weight.is_cuda
            and hidden.dtype in _HALF_DTYPES and weight.dtype in _HALF_DTYPES)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _shifted_logits(h, w, vocab_start, true_vocab, inv_temp, group, tf32=False):
    """``z - max(z)`` of one chunk (fp32, padded columns cut off) and the global row max.

    Returns ``(zs [c, n_valid], zmax [c], n_valid)``; ``zs`` is the only ``[c, V]`` buffer allocated here.
    ``tf32``: run the GEMM on TF32 tensor cores (caller checked that ``h``/``w`` were 16-bit; exact products).
    """
    with tf32_matmuls(tf32):
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


def _chunk_stats(h, w, tgt, vocab_start, true_vocab, inv_temp, group, tf32=False):
    """Shifted logits plus the global ``log Σ exp(zs)``, shifted target logit and ``E_p[zs]`` of a chunk.

    Memory: two ``[c, V_local]`` fp32 buffers at most (the logits and their exponentials).
    """
    zs, zmax, n_valid = _shifted_logits(h, w, vocab_start, true_vocab, inv_temp, group, tf32)
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
    def forward(ctx, hidden, weight, targets, vocab_start, true_vocab, inv_temp, chunk, group, reduce_grad_hidden,
                tf32):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            zs, _, _, _, log_se, tlogit, ez = _chunk_stats(hidden[s:e], weight, targets[s:e], vocab_start,
                                                           true_vocab, inv_temp, group, tf32)
            del zs
            logp[s:e] = tlogit - log_se   # shifts cancel: (z_t - m) - (lse - m)
            ent[s:e] = log_se - ez        # H = lse - E[z] = log Σ exp(zs) - E[zs]
        ctx.save_for_backward(hidden, weight, targets)
        ctx.cfg = (vocab_start, true_vocab, inv_temp, chunk, group, reduce_grad_hidden, tf32)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets = ctx.saved_tensors
        vocab_start, true_vocab, inv_temp, chunk, group, reduce_grad_hidden, tf32 = ctx.cfg
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
                                                                  true_vocab, inv_temp, group, tf32)
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
            with tf32_matmuls(tf32):   # error bound: tf32_matmuls docstring
                grad_h[s:e] = gz @ wf[:n_valid]
                grad_w[:n_valid] += gz.t() @ h
        # every TP rank contributes its vocabulary slice's part of dL/dh (unless a sequence-parallel gather's
        # backward reduce-scatters it instead)
        if reduce_grad_hidden:
            _all_reduce(grad_h, dist.ReduceOp.SUM, group)
        return (grad_h.to(hidden.dtype), grad_w.to(weight.dtype), None, None, None, None, None, None, None, None)


def vocab_parallel_logprobs_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                    vocab_start: int = 0, true_vocab_size: Optional[int] = None,
                                    temperature: float = 1.0, chunk_size: int = 1024,
                                    tp_group=None, reduce_grad_hidden: bool = True,
                                    tf32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
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
        tf32: when ``hidden`` and ``weight`` are both bf16/fp16 CUDA tensors, run the fp32 logit GEMMs
            (forward and backward) on TF32 tensor cores via :func:`tf32_matmuls` (exact products in forward;
            error bound for backward there). Ignored for fp32 inputs and on CPU, which keep exact fp32 math.

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
                                        1.0 / float(temperature), int(chunk_size), tp_group, bool(reduce_grad_hidden),
                                        _use_tf32(tf32, hidden, weight))


def naive_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Reference: full-logits ``log_softmax`` (materialises ``[N, V]``); for tests and benchmarks."""
    z = logits.float() / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent
