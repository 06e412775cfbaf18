"""The actor's non-finite guard (issue 16): megatron-core's optimizer step with a finiteness check first.

megatron-core's optimizers look for inf/NaN only through a loss scaler (fp16); in our fp32 and bf16 configs
``optimizer.step()`` applies whatever the gradients hold, and clipping with a NaN norm multiplies every
gradient by NaN. :meth:`NonFiniteGuard.step` therefore runs the optimizer's own stages itself
(``prepare_grads`` -> ``get_grad_norm`` -> clip -> ``step_with_ready_grads``, as ``ChainedOptimizer.step``
does) and, between the norm and the clip, checks the loss terms of every micro-batch and the global gradient
norm with ONE all-reduce of a flag vector over all ranks (model-parallel and data-parallel). A non-finite
update is skipped on every rank: parameters, fp32 master weights, Adam moments and step count and the LR
scheduler stay bit-identical, and the gradients are zeroed.

The per-micro-batch half (:func:`nonfinite_bits`, and the test hook :func:`injected_term`) runs inside
the loss function of :meth:`~megatron_dapo.actor.megatron_actor.MegatronActor.train_step`.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..backend import default_device
from ..batch import ActorBatch

log = logging.getLogger("megatron_dapo")

NONFINITE_TERMS = ("policy_loss", "entropy", "kl_loss", "ratio")
"""Loss terms checked per micro-batch; ``ratio`` is the importance ratio (its mean and the log-ratio sum)."""

TEST_NONFINITE_ENV = "MEGATRON_DAPO_TEST_NONFINITE"
"""Test hook, never set in production: JSON that makes
:meth:`~megatron_dapo.actor.megatron_actor.MegatronActor.train_step` inject a non-finite value (see
:func:`parse_test_injection`). Tests may also assign ``actor.test_injection``."""

_MB_SLOT = 1.0e6  # flag slot value for micro-batch k is _MB_SLOT - k, so the MAX reduction keeps the first


def parse_test_injection(text: Optional[str]) -> Optional[dict]:
    """Parse the :data:`TEST_NONFINITE_ENV` hook. Keys: ``updates`` (list of 0-based update indices of this
    actor) or ``from_update`` (every update from that index on); ``kind`` ``loss`` (with ``term`` in
    :data:`NONFINITE_TERMS`, ``micro_batch`` and ``dp_rank``: that DP rank's local micro-batch) or ``grad``
    (with ``rank``: the global rank whose optimizer gradient shard ``param_index`` gets the value); ``value``
    ``nan`` or ``inf``.

    Raises:
        ValueError: ``kind`` or ``term`` not one of the above.
        json.JSONDecodeError: ``text`` is not JSON.
    """
    if not text:
        return None
    spec = json.loads(text)
    if spec.get("kind") not in ("loss", "grad"):
        raise ValueError(f"{TEST_NONFINITE_ENV}: kind must be 'loss' or 'grad', got {spec.get('kind')!r}")
    if spec["kind"] == "loss" and spec.get("term", "policy_loss") not in NONFINITE_TERMS:
        raise ValueError(f"{TEST_NONFINITE_ENV}: term must be one of {NONFINITE_TERMS}")
    return spec


class NonFiniteUpdate:
    """What the check of one update found (identical on every rank).

    Attributes:
        skipped: the update was skipped.
        terms: names from :data:`NONFINITE_TERMS` that were non-finite in some micro-batch.
        grad_norm: the global gradient norm was non-finite.
        micro_batches: ``(dp_rank, local micro-batch index)`` of the first bad micro-batch of each DP rank.
    """

    def __init__(self, skipped: bool, terms: tuple[str, ...], grad_norm: bool, micro_batches: list[tuple[int, int]]):
        self.skipped, self.terms, self.grad_norm, self.micro_batches = skipped, terms, grad_norm, micro_batches

    def describe(self) -> str:
        parts = [f"non-finite {t}" for t in self.terms]
        if self.grad_norm:
            parts.append("non-finite gradient norm")
        where = ", ".join(f"micro-batch {m} of DP rank {d}" for d, m in self.micro_batches)
        return " and ".join(parts) + (f" (first in {where})" if where else "")


class NonFiniteGuard:
    """The guard of one actor: the checked optimizer step, the test hook and the latest check result.

    Args:
        chunks: the actor's DDP-wrapped model chunks (their grad buffers are zeroed on a skip).
        optimizer: the actor's megatron-core optimizer (``ChainedOptimizer`` or a single one).
        rank: this process's global rank.
        dp_rank: data-parallel rank.
        dp_size: data-parallel world size.
        last_stage: this rank is on the last pipeline stage (``is_pipeline_last_stage(ignore_virtual=True)``),
            where the loss dicts of the micro-batches are.

    The test hook :attr:`test_injection` starts from :data:`TEST_NONFINITE_ENV` (``None`` when unset).
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], optimizer, *, rank: int, dp_rank: int, dp_size: int,
                 last_stage: bool):
        self.chunks, self.optimizer = list(chunks), optimizer
        self.rank, self.dp_rank, self.dp_size, self.last_stage = rank, dp_rank, dp_size, last_stage
        self.test_injection: Optional[dict] = parse_test_injection(os.environ.get(TEST_NONFINITE_ENV))
        """The parsed test hook (see :func:`parse_test_injection`); tests may assign it."""
        self.last: Optional[NonFiniteUpdate] = None
        """The check result of the latest update (``skipped`` False when it was applied)."""

    def injection(self, update_index: int, apply_update: bool) -> Optional[dict]:
        """The test hook's spec when it applies to the update about to run (never in production).

        ``update_index`` is the 0-based index of that update among this actor's ``train_step(apply_update=True)``
        calls."""
        spec = self.test_injection
        if spec is None or not apply_update:
            return None
        i = update_index
        hit = i in spec.get("updates", []) or ("from_update" in spec and i >= int(spec["from_update"]))
        return spec if hit else None

    def step(self, outs: list[dict], inject: Optional[dict], update_index: int) -> tuple[NonFiniteUpdate, float]:
        """megatron-core's optimizer step with a finiteness check before anything is applied.

        The stages of ``ChainedOptimizer.step`` (megatron-core 0.16.1): ``prepare_grads`` (model grads ->
        fp32 main grads; the fp16 loss scaler's inf check), ``get_grad_norm`` (global L2 norm over the
        grad-stats group), clipping by that norm, ``step_with_ready_grads`` (Adam, main -> model params,
        the distributed optimizer's param all-gather). Between the norm and the clip one MAX all-reduce over
        every rank combines: the scaler's flag, a non-finite norm, the non-finite loss terms of each
        micro-batch and the first bad micro-batch of each DP rank. When anything is non-finite nothing
        further runs (no clip, no Adam step) and all gradients are zeroed. The result is kept in :attr:`last`.

        Args:
            outs: the loss dicts of this rank's micro-batches, in order (last pipeline stage; ignored
                elsewhere); ``_nonfinite`` holds :func:`nonfinite_bits`.
            inject: the test hook's spec for this update (:meth:`injection`), else ``None``.
            update_index: 0-based index of this update (named in the warning of a skipped one).

        Returns:
            (what was found, the global gradient norm as a float; inf/nan when non-finite).

        Raises:
            RuntimeError: megatron-core's ``step_with_ready_grads`` reported failure.

        Collective: every rank (default process group) must call it.
        """
        opt = self.optimizer
        found_inf = bool(opt.prepare_grads())
        if inject is not None and inject["kind"] == "grad" and self.rank == int(inject.get("rank", 0)):
            grads = [p.grad for o in getattr(opt, "chained_optimizers", [opt]) if getattr(o, "optimizer", None)
                     for g in o.optimizer.param_groups for p in g["params"] if p.grad is not None and p.grad.numel()]
            grads[int(inject.get("param_index", 0))].view(-1)[0] = float(inject.get("value", "inf"))
        grad_norm = float(opt.get_grad_norm())
        n_terms = len(NONFINITE_TERMS)
        flags = torch.zeros(2 + n_terms + self.dp_size, dtype=torch.float64)
        flags[0] = 1.0 if found_inf else 0.0
        flags[1] = 0.0 if math.isfinite(grad_norm) else 1.0
        if self.last_stage:
            for k, o in enumerate(outs):
                bits = int(o.get("_nonfinite", 0.0))
                if not bits:
                    continue
                for i in range(n_terms):
                    if bits >> i & 1:
                        flags[2 + i] = 1.0
                flags[2 + n_terms + self.dp_rank] = max(float(flags[2 + n_terms + self.dp_rank]), _MB_SLOT - k)
        flags = flags.to(default_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # default group: every TP x PP x CP x DP rank
        flags = flags.cpu()
        terms = tuple(t for i, t in enumerate(NONFINITE_TERMS) if flags[2 + i] > 0)
        mbs = [(d, int(_MB_SLOT - flags[2 + n_terms + d])) for d in range(self.dp_size) if flags[2 + n_terms + d] > 0]
        skipped = bool(flags[0] > 0 or flags[1] > 0 or terms)
        check = NonFiniteUpdate(skipped, terms, bool(flags[1] > 0), mbs)
        self.last = check
        if check.grad_norm and math.isfinite(grad_norm):
            grad_norm = math.inf  # a shard elsewhere was non-finite: report the same on every rank
        if skipped:
            opt.zero_grad()
            for m in self.chunks:
                m.zero_grad_buffer()
            if self.rank == 0:
                log.warning("update %d skipped: %s; parameters, optimizer state and LR schedule unchanged",
                            update_index, check.describe())
            return check, grad_norm
        # heavy: megatron-core, imported once a model is built (after the CPU shims)
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        for o in getattr(opt, "chained_optimizers", [opt]):
            if getattr(o, "is_stub_optimizer", False) or o.config.clip_grad <= 0.0:
                continue
            params = o.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, max_norm=o.config.clip_grad, total_norm=grad_norm,
                                             use_decoupled_grad=o.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        if not opt.step_with_ready_grads():
            raise RuntimeError("megatron-core optimizer step_with_ready_grads reported failure")
        return check, grad_norm


def nonfinite_bits(out: dict[str, float], total: float) -> int:
    """Bit ``i`` set when term ``NONFINITE_TERMS[i]`` of one micro-batch's loss dict is non-finite.

    ``ratio`` covers ``ratio_mean`` and ``approx_kl`` (the mean log-ratio); a non-finite total whose terms
    all look finite is attributed to ``policy_loss``."""
    bits = 0
    checks = {"policy_loss": [out.get("pg_loss", 0.0)], "entropy": [out.get("entropy", 0.0)],
              "kl_loss": [out.get("kl_loss", 0.0)], "ratio": [out.get("ratio_mean", 1.0), out.get("approx_kl", 0.0)]}
    for i, t in enumerate(NONFINITE_TERMS):
        if not all(math.isfinite(v) for v in checks[t]):
            bits |= 1 << i
    if not bits and not math.isfinite(total):
        bits = 1
    return bits


def injected_term(spec: Optional[dict], mb: ActorBatch, dp_rank: int) -> Optional[tuple[str, float]]:
    """(term, value) when the test hook targets this micro-batch on this DP rank."""
    if spec is None or spec["kind"] != "loss":
        return None
    if mb.extras.get("mb_index") != int(spec.get("micro_batch", 0)) or dp_rank != int(spec.get("dp_rank", 0)):
        return None
    return spec.get("term", "policy_loss"), float(spec.get("value", "nan"))
