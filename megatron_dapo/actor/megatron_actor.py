"""The Megatron actor: a megatron-core ``GPTModel`` (TP/PP/VPP/DP) with Megatron's DDP and optimizer.

One instance lives in every trainer process (SPMD). All ranks call every public method in the same
order. The batch is either identical on all ranks (each DP rank picks its share) or, with ``local=True``,
already this DP rank's share (:mod:`megatron_dapo.actor.dispatch`; TP/PP peers hold the same rows).

Loss scaling (exact token-mean across micro-batches and DP): megatron-core divides each micro-batch's
loss by the number of micro-batches ``M`` (``schedules.forward_step``) and DDP averages gradients over
the ``D`` data-parallel ranks. Each micro-batch therefore returns
``agg(loss over its tokens, denominator = global count) × M × D``, so the accumulated gradient equals the
gradient of the single-process aggregate over the whole mini-batch (DAPO eq. 8 for ``token-mean``).

Non-finite guard (issue 16): the optimizer step of :meth:`MegatronActor.train_step` is checked for
inf/NaN loss terms and gradient norm on every rank first and skipped everywhere when any is found; see
:mod:`megatron_dapo.actor.nonfinite`.

HF weight I/O (HF safetensors into the shards, full / HF tensors out for weight sync and export):
:mod:`megatron_dapo.actor.hf_weights`.
"""
from __future__ import annotations

import contextlib
import logging
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from ..algorithm import (RolloutCorrection, agg_loss, compute_decoupled_policy_loss, kl_penalty,
                         rollout_correction_keep_mask)
from ..backend import default_device, has_cuda, has_transformer_engine
from ..batch import ActorBatch
from ..cpu_shims import apply_cpu_shims, device_remap, enable_local_thd_attention
from ..models import mapping
from ..models.hf_config import ModelSpec, gpt_model_kwargs, spec_from_hf_config, transformer_config_kwargs
from ..models.hf_config import layer_spec as layer_spec_for
from . import hf_weights
from .batching import balance_across_ranks, make_micro_batches, pad_columns
from .logprobs import vocab_parallel_logprobs_entropy
from .nonfinite import NONFINITE_TERMS, NonFiniteGuard, NonFiniteUpdate, injected_term, nonfinite_bits
from .offload import ActorOffloader, ensure_onloaded
from .packing import make_packed_micro_batches, pack_sequences, packing_pad_multiple, padded_length
from .parallel import init_parallel

log = logging.getLogger("megatron_dapo")

@dataclass
class LossSettings:
    """What the training loss needs from the resolved algorithm config."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: Optional[float] = None
    loss_agg_mode: str = "token-mean"
    entropy_coeff: float = 0.0
    kl_loss_coef: float = 0.0
    kl_loss_type: str = "k3"
    correction: Optional[RolloutCorrection] = None
    """Behaviour-policy corrections of the decoupled loss (``algorithm.tis_cap`` / ``seq_is_mask_*`` /
    ``seq_is_mode`` / ``icepop_*`` / ``masked_tokens_in_denominator``, built once by
    :meth:`RolloutCorrection.from_config`); ``None``: none."""
    temperature: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> "LossSettings":
        """The loss of a :class:`~megatron_dapo.config.DAPOConfig`: clipping, aggregation and KL of the resolved
        algorithm (``kl_loss_coef`` 0 unless ``kl_loss``), ``algorithm.entropy_coeff``, the behaviour-policy
        corrections of ``cfg.algorithm`` (with the default TIS cap of a run that trains stale tokens) and the
        sampling ``rollout.temperature``.

        Raises:
            ConfigError: an invalid ``algorithm.*`` switch.
        """
        alg = cfg.resolved_algorithm()
        return cls(clip_ratio_low=alg.clip_ratio_low, clip_ratio_high=alg.clip_ratio_high,
                   clip_ratio_c=alg.clip_ratio_c, loss_agg_mode=alg.loss_agg_mode,
                   entropy_coeff=cfg.algorithm.entropy_coeff,
                   kl_loss_coef=float(alg.kl_loss_coef) if alg.kl_loss else 0.0, kl_loss_type=alg.kl_loss_type,
                   correction=RolloutCorrection.from_config(cfg.algorithm, cfg.stale_token_sources()),
                   temperature=cfg.rollout.temperature)


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


class MegatronActor:
    """Policy model on megatron-core.

    Args:
        hf_path: HF model directory (config.json + safetensors) the weights come from.
        actor_cfg: :class:`megatron_dapo.config.ActorConfig`.
        total_train_steps: rollout (trainer) steps of the whole run: the length of the LR schedule, which
            advances once per rollout step (:meth:`set_lr_step`), not per optimizer update.
        seed: RNG seed.
        collective_timeout_s: timeout of the process groups' collectives (seconds; the trainer passes
            ``trainer.collective_timeout_min`` x 60): see :func:`~megatron_dapo.actor.parallel.init_parallel`.
    """

    def __init__(self, hf_path: str | Path, actor_cfg, *, total_train_steps: int = 1, seed: int = 1234,
                 load_weights: bool = True, collective_timeout_s: float = 1800.0):
        apply_cpu_shims()
        # heavy: megatron-core, imported once a model is built (after the CPU shims)
        from megatron.core import parallel_state as ps

        self.cfg = actor_cfg
        self.hf_path = Path(hf_path)
        self.spec: ModelSpec = spec_from_hf_config(self.hf_path)
        tp, pp = actor_cfg.tensor_model_parallel_size, actor_cfg.pipeline_model_parallel_size
        vpp = actor_cfg.virtual_pipeline_model_parallel_size
        ep, etp = actor_cfg.expert_model_parallel_size, actor_cfg.expert_tensor_parallel_size
        if (ep > 1 or etp is not None) and not self.spec.is_moe:
            raise ValueError(f"actor.expert_model_parallel_size={ep} / expert_tensor_parallel_size={etp}: "
                             f"{self.hf_path} is a dense {self.spec.family} model (no experts)")
        init_parallel(tp=tp, pp=pp, vpp=vpp, cp=actor_cfg.context_parallel_size, seed=seed,
                      timeout_s=collective_timeout_s, ep=ep, etp=etp)
        self.ps = ps
        self.tp, self.pp, self.vpp = tp, pp, vpp
        self.ep, self.etp = ep, (tp if etp is None else etp)
        """Expert-parallel and expert-tensor-parallel sizes (1 and TP for dense models)."""
        self.ep_rank = ps.get_expert_model_parallel_rank() if self.spec.is_moe else 0
        self.etp_rank = ps.get_expert_tensor_parallel_rank() if self.spec.is_moe else 0
        self._expert_lockstep = self.spec.is_moe and ep > 1
        """MoE with expert parallelism: data-parallel ranks run equal micro-batch counts (:meth:`_run`)."""
        if self._expert_lockstep and actor_cfg.pack_sequences:
            raise ValueError("actor.pack_sequences: packing with actor.expert_model_parallel_size > 1 is not "
                             "supported (packed micro-batches differ in count and length across expert-parallel "
                             "ranks); set actor.pack_sequences=false")
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.rank = dist.get_rank()
        self.padded_vocab = self.spec.padded_vocab_size(tp, actor_cfg.make_vocab_size_divisible_by)
        self._remap = contextlib.ExitStack()
        self._remap.enter_context(device_remap())
        self._offloader: Optional[ActorOffloader] = None  # built at the first offload()
        self.chunks = self._build_model()
        if load_weights:
            self.load_hf_weights(self.hf_path)
        self._wrap_ddp_and_optimizer(total_train_steps)
        self._owners: Optional[dict[str, tuple[int, int, str]]] = None
        self.num_updates = 0
        """``train_step(apply_update=True)`` calls so far in this process (skipped ones included)."""
        self.nonfinite = NonFiniteGuard(self.chunks, self.optimizer, rank=self.rank, dp_rank=self.dp_rank,
                                        dp_size=self.dp_size, last_stage=ps.is_pipeline_last_stage(ignore_virtual=True))
        """The optimizer step's non-finite guard (:mod:`megatron_dapo.actor.nonfinite`)."""

    @property
    def last_nonfinite(self) -> Optional[NonFiniteUpdate]:
        """The check result of the latest update (``skipped`` False when it was applied); ``None`` before."""
        return self.nonfinite.last

    @property
    def test_injection(self) -> Optional[dict]:
        """The non-finite test hook (:data:`~megatron_dapo.actor.nonfinite.TEST_NONFINITE_ENV`); tests assign it."""
        return self.nonfinite.test_injection

    @test_injection.setter
    def test_injection(self, spec: Optional[dict]) -> None:
        self.nonfinite.test_injection = spec

    # ------------------------------------------------------------------ construction
    def _build_model(self):
        # heavy: megatron-core, imported once a model is built (after the CPU shims)
        from megatron.core.models.gpt import GPTModel
        from megatron.core.transformer import TransformerConfig

        c = self.cfg
        on_cpu = not has_cuda()
        kw = transformer_config_kwargs(
            self.spec, tp=self.tp, pp=self.pp, vpp=self.vpp, params_dtype=c.params_dtype,
            sequence_parallel=c.sequence_parallel, context_parallel=c.context_parallel_size,
            recompute=c.recompute, fp8=c.fp8, fp8_recipe=c.fp8_recipe, on_cpu=on_cpu,
            num_layers_in_first_pipeline_stage=c.num_layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage=c.num_layers_in_last_pipeline_stage,
            ep=self.ep, etp=self.etp, moe_token_dispatcher_type=c.moe_token_dispatcher_type,
            moe_aux_loss_coeff=c.moe_aux_loss_coeff)
        self.tconfig = TransformerConfig(**kw)
        use_te = not (on_cpu or c.fp8 is None and not _has_te())
        from .attention import apply_attention_backend  # heavy: megatron-core (after the CPU shims)
        chunks = []
        for vp in range(self.vpp or 1):
            vp_stage = vp if self.vpp else None
            # MoE models: this (virtual) stage's layers, MoE or dense each (megatron-core's block spec)
            layer_spec = layer_spec_for(self.spec, self.tconfig, use_te=use_te, vp_stage=vp_stage)
            layer_spec = apply_attention_backend(layer_spec, c.attention_backend)
            model = GPTModel(
                config=self.tconfig, transformer_layer_spec=layer_spec,
                pre_process=self.ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=self.ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage, **gpt_model_kwargs(self.spec, self.padded_vocab))
            if model.post_process:
                # The LM head is applied by the memory-lean chunked logprob kernel, not by GPTModel.
                model.output_layer.forward = types.MethodType(_hidden_passthrough, model.output_layer)
            if has_cuda():
                model.cuda(torch.cuda.current_device())
            chunks.append(model)
        return chunks

    def _wrap_ddp_and_optimizer(self, total_train_steps: int) -> None:
        # heavy: megatron-core, imported once a model is built (after the CPU shims)
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        c = self.cfg
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=c.use_distributed_optimizer)
        self.chunks = [DistributedDataParallel(config=self.tconfig, ddp_config=ddp_cfg, module=m,
                                               disable_bucketing=(i > 0))
                       for i, m in enumerate(self.chunks)]
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        no_sync = [m.no_sync for m in self.chunks]
        self.tconfig.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        ocfg = OptimizerConfig(optimizer=c.optimizer, lr=c.lr, min_lr=c.min_lr, weight_decay=c.weight_decay,
                               adam_beta1=c.adam_beta1, adam_beta2=c.adam_beta2, adam_eps=c.adam_eps,
                               clip_grad=c.clip_grad, bf16=c.params_dtype == "bf16",
                               params_dtype=torch.bfloat16 if c.params_dtype == "bf16" else torch.float32,
                               use_distributed_optimizer=c.use_distributed_optimizer)
        self.optimizer = get_megatron_optimizer(ocfg, self.chunks)
        # The schedule counts rollout steps (DAPO: "linear warm-up over 20 rollout steps"), see set_lr_step.
        # megatron-core needs decay steps > warm-up steps; a run shorter than its warm-up ends inside it.
        warm = c.lr_warmup_steps
        decay = max(1, total_train_steps, warm + 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if warm else c.lr, max_lr=c.lr, min_lr=min(c.min_lr, c.lr),
            lr_warmup_steps=warm, lr_decay_steps=decay, lr_decay_style=c.lr_decay_style,
            start_wd=c.weight_decay, end_wd=c.weight_decay, wd_incr_steps=decay, wd_incr_style="constant")
        self.set_lr_step(0)

    def set_lr_step(self, step: int) -> float:
        """Put the LR schedule at rollout step ``step`` (0-based) and return the learning rate that every
        optimizer update of that step uses (the same on all ranks; constant within the step).

        With ``W = actor.lr_warmup_steps`` and ``T`` the schedule length (``total_train_steps``):

        * warm-up, ``step < W``: ``lr * (step + 1) / W`` (no step trains at LR 0; step ``W - 1`` is the first
          at the full ``actor.lr``);
        * then ``actor.lr_decay_style`` from ``actor.lr`` at step ``W``: ``constant``; ``linear`` /
          ``cosine`` with decay ratio ``(step - W) / (T - W)`` towards ``actor.min_lr``.

        This is megatron-core's ``OptimizerParamScheduler.get_lr`` at position ``step + 1`` during warm-up
        and ``step`` after it. The position is absolute, so a resumed run (the checkpoint holds the
        scheduler) continues exactly, and skipped (non-finite) updates do not move it.

        Raises:
            ValueError: ``step`` is negative.
        """
        if step < 0:
            raise ValueError(f"rollout step must be >= 0, got {step}")
        self.scheduler.num_steps = step + 1 if step < self.scheduler.lr_warmup_steps else step
        self.scheduler.step(increment=0)  # sets every param group's lr (and weight decay) at this position
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ names
    def _local_params(self) -> Iterator[tuple[str, int, str, torch.nn.Parameter]]:
        """(canonical global name, chunk index, local name, param) for this rank's parameters."""
        for ci, chunk in enumerate(self.chunks):
            for cname, lname, p in mapping.local_params(_unwrap(chunk), self.spec):
                yield cname, ci, lname, p

    # ------------------------------------------------------------------ HF weights in / out
    def load_hf_weights(self, hf_path: str | Path) -> None:
        """Copy HF safetensors weights into this rank's shards; see :func:`.hf_weights.load_hf_weights`."""
        hf_weights.load_hf_weights(self, hf_path)

    def iter_full_params(self, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(canonical_name, full tensor)`` for every parameter, on data-parallel rank 0 ranks.
        Collective; see :func:`.hf_weights.iter_full_params`."""
        return hf_weights.iter_full_params(self, dtype)

    def iter_full_grads(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Like :meth:`iter_full_params` but for the DP-reduced gradients (``main_grad``, fp32) left by
        ``train_step(apply_update=False)``; see :func:`.hf_weights.iter_full_grads`."""
        return hf_weights.iter_full_grads(self)

    def iter_hf_tensors(self, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, tensor)`` (HF layout, vocab padding dropped). Collective; see
        :func:`.hf_weights.iter_hf_tensors`."""
        return hf_weights.iter_hf_tensors(self, dtype)

    # ------------------------------------------------------------------ forward / loss
    def _token_logprobs(self, gpt, hidden: torch.Tensor, mb: ActorBatch, temperature: float):
        """Logprobs/entropy ``[b, l]`` of tokens 1..l-1 at positions where the response mask is set.

        ``hidden`` is ``[b, l, h]`` (padded rows) or, when ``mb.extras["packed"]`` holds a
        :class:`~megatron_dapo.actor.packing.PackedMicroBatch`, the packed row ``[1, T, h]``: the hidden
        state predicting token ``[i, j]`` is then read at packed position ``cu_seqlens_padded[i] + j - 1``,
        so the result has the same ``[b, l]`` meaning in both layouts.
        """
        packed = mb.extras.get("packed") if mb.extras else None
        b, l = mb.response_mask.shape
        h = hidden.shape[-1]
        sel = torch.zeros(b, l, dtype=torch.bool)
        sel[:, 1:] = mb.response_mask[:, 1:] > 0
        flat = sel.reshape(-1).nonzero().squeeze(1).to(hidden.device)
        if packed is None:
            src = (sel.reshape(b, l).roll(-1, dims=1)).reshape(-1).nonzero().squeeze(1).to(hidden.device)
        else:
            rows, cols = sel.nonzero(as_tuple=True)
            src = (packed.packed_offsets()[rows] + cols - 1).to(hidden.device)
        hid = hidden.reshape(-1, h).index_select(0, src)
        tgt = mb.input_ids.reshape(-1).to(hidden.device).index_select(0, flat)
        w = hf_weights.output_weight(self, gpt)
        vl = w.shape[0]
        lp, ent = vocab_parallel_logprobs_entropy(
            hid, w, tgt, vocab_start=self.tp_rank * vl, true_vocab_size=self.spec.vocab_size,
            temperature=temperature, chunk_size=self.cfg.logprob_chunk_size,
            tp_group=self.ps.get_tensor_model_parallel_group() if self.tp > 1 else None,
            reduce_grad_hidden=not self.tconfig.sequence_parallel, tf32=self.cfg.logprob_tf32)
        out_lp = torch.zeros(b * l, dtype=torch.float32, device=hidden.device).index_put((flat,), lp)
        out_ent = torch.zeros(b * l, dtype=torch.float32, device=hidden.device).index_put((flat,), ent)
        return out_lp.reshape(b, l), out_ent.reshape(b, l)

    def _forward_step(self, loss_fn, data_iterator, model):
        mb: ActorBatch = next(data_iterator)
        dev = default_device()
        packed = mb.extras.get("packed") if mb.extras else None
        if packed is not None:
            # one THD row [1, T]: attention per cu_seqlens segment (TE, SDPAttention, or cpu_shims 5 for local), RoPE
            # restarting at every segment; the last stage returns hidden [1, T, h] (see _token_logprobs)
            out = model(packed.input_ids.to(dev), packed.position_ids.to(dev), None,
                        packed_seq_params=packed.packed_seq_params(dev))
            return out, partial(loss_fn, model, mb)
        tokens = mb.input_ids.to(dev)
        b, l = tokens.shape
        pos = torch.arange(l, device=dev).unsqueeze(0).expand(b, l)
        causal = torch.ones(l, l, dtype=torch.bool, device=dev).triu(1).view(1, 1, l, l)
        out = model(tokens, pos, causal)
        return out, partial(loss_fn, model, mb)

    def _run(self, batch: ActorBatch, loss_fn, forward_only: bool, local: bool = False):
        """Split ``batch`` over DP (unless ``local``: it is this DP rank's share already), into
        micro-batches, and run Megatron's schedule. Returns the loss dicts (last stage only) and the local
        row indices in micro-batch order."""
        lengths = batch.seq_lengths.tolist()
        if local and not lengths:
            raise ValueError(f"data-parallel rank {self.dp_rank} received no rows")
        mine = list(range(len(lengths))) if local else balance_across_ranks(lengths, self.dp_size)[self.dp_rank]
        pack = self.cfg.pack_sequences
        if pack:
            enable_local_thd_attention()  # the local layer spec (CPU, or GPU without TE) needs it
            pad_multiple = packing_pad_multiple(self.tp, self.cfg.context_parallel_size,
                                                self.tconfig.sequence_parallel, self.cfg.fp8 is not None)
            groups = make_packed_micro_batches([lengths[i] for i in mine], self.cfg.max_tokens_per_gpu,
                                               pad_multiple, self.cfg.micro_batch_size)
        else:
            groups = make_micro_batches([lengths[i] for i in mine], self.cfg.max_tokens_per_gpu,
                                        self.cfg.micro_batch_size)
        if self.vpp and len(groups) % self.pp:
            # the interleaved schedule needs a multiple of PP micro-batches (megatron-core asserts it)
            if len(mine) < self.pp:
                raise ValueError(f"interleaved pipeline (PP={self.pp}) needs >= {self.pp} sequences per "
                                 f"data-parallel rank, got {len(mine)}")
            n_groups = -(-len(groups) // self.pp) * self.pp
            if n_groups > len(mine):
                n_groups = len(mine) // self.pp * self.pp
            order = sorted(range(len(mine)), key=lambda j: -lengths[mine[j]])
            groups = [sorted(order[k::n_groups]) for k in range(n_groups)]
        rows = [[mine[j] for j in g] for g in groups]
        seq_length, mb_size = int(batch.input_ids.shape[1]), max(len(r) for r in rows)
        # sequence parallelism splits the sequence over TP ranks: padded widths must divide by TP
        sp_multiple = self.tp if self.tconfig.sequence_parallel else 1
        if self._expert_lockstep:
            return self._run_expert_lockstep(batch, loss_fn, forward_only, mine, rows, sp_multiple)
        if pack:
            mbs = [batch.select(r) for r in rows]
            seq_length = max(sum(padded_length(lengths[i], pad_multiple) for i in r) for r in rows)
            mb_size = 1
            # fixed p2p shapes (interleaved pipeline on gloo): every packed row gets the same length
            pad_to = None if self.tconfig.variable_seq_lengths else seq_length
            for mb in mbs:
                mb.extras["packed"] = pack_sequences(mb.input_ids, mb.seq_lengths, pad_multiple=pad_multiple,
                                                     pad_to=pad_to)
        elif self.tconfig.variable_seq_lengths:
            mbs = [pad_columns(batch.select(r), sp_multiple) for r in rows]
        else:
            # fixed p2p shapes (interleaved pipeline on gloo): every micro-batch is [max rows, L]; filler
            # rows repeat a real row with an all-zero response mask (no loss, no gradient, dropped below)
            width = max(len(r) for r in rows)
            mbs = [pad_columns(batch.select(r + [r[-1]] * (width - len(r)), trim=False), sp_multiple)
                   for r in rows]
            for mb, r in zip(mbs, rows):
                mb.response_mask[len(r):] = 0
            seq_length = int(mbs[0].input_ids.shape[1])
        return self._schedule(mbs, loss_fn, forward_only, seq_length, mb_size), rows

    def _run_expert_lockstep(self, batch: ActorBatch, loss_fn, forward_only: bool, mine: list[int],
                             rows: list[list[int]], sp_multiple: int):
        """:meth:`_run` for MoE models with expert parallelism: every MoE layer exchanges tokens with the other
        expert-parallel ranks (data-parallel peers with other rows), so all data-parallel ranks run the same
        number of micro-batches; with the ``allgather`` dispatcher (fixed shapes) also of the same
        ``[rows, L]``. Missing micro-batches are filler (a real row with an all-zero response mask: no loss,
        no gradient, no output row).

        Raises:
            ValueError: this data-parallel rank has no row (it could not build a filler micro-batch).
        """
        if not mine:
            raise ValueError(f"expert parallelism: data-parallel rank {self.dp_rank} received no rows (the batch "
                             f"needs at least one sequence per data-parallel rank)")
        fixed = not self.tconfig.variable_seq_lengths
        width = int(batch.input_ids.shape[1])
        width += (-width) % sp_multiple
        shape = torch.tensor([len(rows), max(len(r) for r in rows), width], device=default_device())
        dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=self.ps.get_data_parallel_group())
        n_mb, mb_rows, width = (int(v) for v in shape.tolist())
        rows = rows + [[] for _ in range(n_mb - len(rows))]
        mbs = []
        for r in rows:
            take = r or [mine[0]]
            if fixed:
                take = take + [take[-1]] * (mb_rows - len(take))
                mb = pad_columns(batch.select(take, trim=False), width)
            else:
                mb = pad_columns(batch.select(take), sp_multiple)
            mb.response_mask[len(r):] = 0
            mbs.append(mb)
        seq_length = width if fixed else max(int(mb.input_ids.shape[1]) for mb in mbs)
        return self._schedule(mbs, loss_fn, forward_only, seq_length, mb_rows), rows

    def _schedule(self, mbs: list[ActorBatch], loss_fn, forward_only: bool, seq_length: int, mb_size: int):
        """Run megatron-core's forward(-backward) schedule over the micro-batches ``mbs``; returns its loss
        dicts (last stage only)."""
        # heavy: megatron-core, imported once a model is built (after the CPU shims)
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self._num_mb = len(mbs)
        for k, mb in enumerate(mbs):
            mb.extras["mb_index"] = k  # names the micro-batch in non-finite reports
        iters = [iter(list(mbs)) for _ in self.chunks] if len(self.chunks) > 1 else iter(list(mbs))
        fwd_bwd = get_forward_backward_func()
        with torch.set_grad_enabled(not forward_only):
            out = fwd_bwd(forward_step_func=partial(self._forward_step, loss_fn), data_iterator=iters,
                          model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                          num_microbatches=len(mbs), seq_length=seq_length,
                          micro_batch_size=mb_size, forward_only=forward_only)
        return out

    def compute_logprobs(self, batch: ActorBatch, temperature: float = 1.0, *,
                         local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies ``[N, L]`` (fp32, zero outside the response mask), on every rank.

        With ``local`` the batch is this DP rank's share (no DP split) and the result covers only its rows
        (shared with the TP/PP peers); otherwise every rank gets the whole batch's result.
        """
        ensure_onloaded(self, "compute_logprobs")
        for m in self.chunks:
            m.eval()

        def loss_fn(model, mb, hidden):
            lp, ent = self._token_logprobs(_unwrap(model), hidden, mb, temperature)
            return torch.zeros((), device=hidden.device), {"logprobs": lp.detach().cpu(), "entropy": ent.detach().cpu()}

        with torch.no_grad():
            outs, rows = self._run(batch, loss_fn, forward_only=True, local=local)
        N, L = batch.input_ids.shape
        res = torch.zeros(2, N, L, dtype=torch.float32)
        if self.ps.is_pipeline_last_stage(ignore_virtual=True) and self.tp_rank == 0:
            for o, r in zip(outs, rows):
                l = min(o["logprobs"].shape[1], L)  # micro-batches may be padded beyond L (sequence parallel)
                res[0, r, :l] = o["logprobs"][: len(r), :l]
                res[1, r, :l] = o["entropy"][: len(r), :l]
        res = res.to(default_device())
        if not local:
            dist.all_reduce(res)  # exactly one contributor per row (last stage, TP rank 0, owning DP rank)
        elif self.tp * self.pp > 1:  # one contributor per row among this DP rank's TP x PP peers
            dist.all_reduce(res, group=self.ps.get_model_parallel_group())
        res = res.cpu()
        return res[0], res[1]

    def train_step(self, batch: ActorBatch, loss: LossSettings, *, global_num_tokens: Optional[int] = None,
                   global_num_seqs: Optional[int] = None, apply_update: bool = True,
                   local: bool = False) -> dict[str, float]:
        """One optimizer step on ``batch`` (a mini-batch; identical on all ranks, or with ``local`` this DP
        rank's share of it, when ``global_num_tokens`` and ``global_num_seqs`` must give the whole
        mini-batch's counts: loss tokens and sequences with at least one). When the corrections drop masked
        tokens from the denominator (:attr:`RolloutCorrection.drops_masked_tokens`, with ``rollout_logprobs``)
        the loss tokens are those of :func:`rollout_correction_keep_mask` (the policy, entropy and KL terms
        are aggregated over them), and so are the global counts: the trainer counts them after the
        old-logprob pass (:meth:`~megatron_dapo.trainer.Trainer._update`).

        Raises:
            ValueError: ``local`` without both global counts.

        With ``apply_update=False`` the reduced gradients stay in the grad buffers (see
        :meth:`iter_full_grads`) and no optimizer step is taken.

        Before the optimizer applies anything the loss terms and the global gradient norm are checked on
        every rank (see :meth:`NonFiniteGuard.step`); a non-finite update is skipped and recorded in
        :attr:`last_nonfinite`.

        Returns metrics (identical on all ranks): ``pg_loss``, clip fractions, ``approx_kl``,
        ``entropy``, ``lr``; with ``apply_update`` also ``grad_norm`` (the global norm before clipping,
        inf/nan for a skipped update), ``update_skipped`` (0/1), ``nonfinite_grad_norm`` and
        ``nonfinite_<term>`` (0/1) for each term of :data:`NONFINITE_TERMS`.
        """
        if local and (global_num_tokens is None or global_num_seqs is None):
            raise ValueError("train_step(local=True) needs global_num_tokens and global_num_seqs of the whole "
                             "mini-batch (a local count would mis-normalise the loss across DP ranks)")
        ensure_onloaded(self, "train_step")
        for m in self.chunks:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        drop = (loss.correction is not None and loss.correction.drops_masked_tokens
                and batch.rollout_logprobs is not None)  # masked tokens leave the normaliser
        counted = batch.response_mask
        if drop and (global_num_tokens is None or global_num_seqs is None):
            counted = rollout_correction_keep_mask(batch.old_logprobs, batch.rollout_logprobs, batch.response_mask,
                                                   loss.correction)
        n_tok = int(counted.sum().item()) if global_num_tokens is None else global_num_tokens
        n_seq = int((counted.sum(1) > 0).sum().item()) if global_num_seqs is None else global_num_seqs
        n_tok, n_seq = max(n_tok, 1), max(n_seq, 1)
        dp = self.dp_size
        seq_mode = loss.loss_agg_mode.startswith("seq-mean")
        norm = dict(global_num_tokens=None if seq_mode else n_tok, global_num_seqs=n_seq if seq_mode else None)

        inject = self.nonfinite.injection(self.num_updates, apply_update)

        def loss_fn(model, mb, hidden):
            lp, ent = self._token_logprobs(_unwrap(model), hidden, mb, loss.temperature)
            mask = mb.response_mask.to(lp.device)
            bad = injected_term(inject, mb, self.dp_rank)  # tests only: (term, value) or None
            old_lp = mb.old_logprobs.to(lp.device)
            if bad and bad[0] == "ratio" and bool((mask > 0).any()):
                old_lp = old_lp.clone()
                r, c = (mask > 0).nonzero()[0].tolist()
                old_lp[r, c] = bad[1]
            agg_mask = mask  # the tokens of the loss normaliser
            if drop:
                agg_mask = rollout_correction_keep_mask(old_lp, mb.rollout_logprobs, mask, loss.correction)
            pg, metrics = compute_decoupled_policy_loss(
                lp, old_lp, mb.rollout_logprobs, mb.advantages.to(lp.device), mask,
                correction=loss.correction, clip_ratio_low=loss.clip_ratio_low, clip_ratio_high=loss.clip_ratio_high,
                clip_ratio_c=loss.clip_ratio_c, loss_agg_mode=loss.loss_agg_mode, **norm)
            if bad and bad[0] == "policy_loss":
                pg = pg * bad[1]
            total = pg
            ent_term = agg_loss(ent, agg_mask, loss.loss_agg_mode, **norm)
            if bad and bad[0] == "entropy":
                ent_term = ent_term * bad[1]
            if loss.entropy_coeff:
                total = total - loss.entropy_coeff * ent_term
            out = {k: float(v) for k, v in metrics.items()}
            out["pg_loss"] = float(pg.detach())
            out["entropy"] = float(ent_term.detach())
            if loss.kl_loss_coef and mb.ref_logprobs is not None:
                kl = agg_loss(kl_penalty(lp, mb.ref_logprobs.to(lp.device), loss.kl_loss_type), agg_mask,
                              loss.loss_agg_mode, **norm)
                if bad and bad[0] == "kl_loss":
                    kl = kl * bad[1]
                total = total + loss.kl_loss_coef * kl
                out["kl_loss"] = float(kl.detach())
            elif bad and bad[0] == "kl_loss":
                raise ValueError("test injection into kl_loss needs kl_loss_coef > 0 and ref_logprobs")
            out["_tokens"] = float(mask.sum())
            out["_nonfinite"] = float(nonfinite_bits(out, float(total.detach())))
            return total * self._num_mb * dp, out

        outs, _ = self._run(batch, loss_fn, forward_only=False, local=local)
        if not apply_update:
            return self._reduce_metrics(outs, extra={"lr": float(self.optimizer.param_groups[0]["lr"])})
        self.num_updates += 1
        check, grad_norm = self.nonfinite.step(outs, inject, self.num_updates - 1)
        lr = self.optimizer.param_groups[0]["lr"]
        extra = {"grad_norm": grad_norm, "lr": float(lr), "update_skipped": 1.0 if check.skipped else 0.0,
                 "nonfinite_grad_norm": 1.0 if check.grad_norm else 0.0}
        extra.update({f"nonfinite_{t}": 1.0 if t in check.terms else 0.0 for t in NONFINITE_TERMS})
        return self._reduce_metrics(outs, extra=extra)

    def _reduce_metrics(self, outs: list[dict], extra: dict[str, float]) -> dict[str, float]:
        """Sum additive terms (pg_loss, entropy, kl: already global-normalised contributions), token-weight
        the fractions, over micro-batches and DP ranks; share with every rank."""
        keys = ["pg_loss", "entropy", "kl_loss", "pg_clipfrac", "pg_clipfrac_high", "pg_clipfrac_low",
                "pg_clipfrac_dual", "approx_kl", "ratio_mean", "seq_is_masked_frac", "icepop_masked_frac", "_tokens"]
        additive = {"pg_loss", "entropy", "kl_loss", "_tokens"}
        vec = torch.zeros(len(keys), dtype=torch.float64)
        if self.ps.is_pipeline_last_stage(ignore_virtual=True) and self.tp_rank == 0:
            for o in outs:
                for i, k in enumerate(keys):
                    v = o.get(k, 0.0)
                    vec[i] += v if k in additive else v * o["_tokens"]
        vec = vec.to(default_device())
        dist.all_reduce(vec)
        vec = vec.cpu()
        tokens = max(float(vec[keys.index("_tokens")]), 1.0)
        res = {k: float(vec[i]) if k in additive else float(vec[i]) / tokens for i, k in enumerate(keys)}
        res.pop("_tokens")
        res.update(extra)
        return res

    # ------------------------------------------------------------------ memory alternation
    def offload(self, force: bool = False) -> dict[str, float]:
        """Move parameters, gradients and optimizer state (fp32 master params, Adam moments) to pinned CPU
        memory and free their device storage (GPU colocation); see :mod:`megatron_dapo.actor.offload`.

        On CPU this is a no-op with the same contract unless ``force`` (tests): call :meth:`onload`
        before the next :meth:`train_step` / :meth:`compute_logprobs` (they raise ``RuntimeError``
        otherwise). Offloading twice is a no-op.

        Returns:
            ``memory/actor_offload_bytes``, per-category ``memory/actor_offload_*_bytes`` and
            ``timing/actor_offload_s`` (also kept in :attr:`offload_metrics`).
        """
        if self._offloader is None:
            self._offloader = ActorOffloader(self.chunks, self.optimizer)
        return self._offloader.offload(force=force)

    def onload(self) -> dict[str, float]:
        """Inverse of :meth:`offload` (a no-op when not offloaded); params, master params and optimizer
        state come back bit-identical. Returns ``memory/actor_onload_bytes``, ``timing/actor_onload_s``, ..."""
        return {} if self._offloader is None else self._offloader.onload()

    @property
    def offloaded(self) -> bool:
        """Whether the parameters / optimizer state are off the device (:meth:`offload` without :meth:`onload`)."""
        return self._offloader is not None and self._offloader.offloaded

    @property
    def offload_metrics(self) -> dict[str, float]:
        """Figures of the latest offload and onload (bytes moved, seconds), for the trainer's log."""
        return dict(self._offloader.metrics) if self._offloader is not None else {}

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, with_optimizer: bool = True) -> dict[str, Any]:
        model_sd: dict[str, Any] = {}
        for i, m in enumerate(self.chunks):
            model_sd[f"model{i}" if len(self.chunks) > 1 else "model"] = _unwrap(m).sharded_state_dict()
        if with_optimizer:
            model_sd["optimizer"] = self.optimizer.sharded_state_dict(model_sd)
        return model_sd

    def close(self) -> None:
        self._remap.close()


def _hidden_passthrough(self, input_, weight=None, runtime_gather_output=None):
    """Replaces ``output_layer.forward``: GPTModel then returns final hidden states ``[b, s, h]``.

    With sequence parallelism (TE layer spec on GPU) the hidden states arrive sharded along the sequence:
    they are gathered here as the real output layer would; the gather's backward reduce-scatters, i.e. sums
    the TP ranks' partial input gradients, so the chunked kernel must then not all-reduce them again
    (``_sp_gathered`` tells :meth:`MegatronActor._token_logprobs`).
    """
    if getattr(self, "sequence_parallel", False):
        # heavy: megatron-core, imported once a model is built (after the CPU shims)
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True)
    return input_, None


def _has_te() -> bool:
    return has_transformer_engine()
