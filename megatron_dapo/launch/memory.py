"""Per-GPU memory of a training layout: weights, gradients, optimizer state, activations, logits, KV cache.

Everything here is analytic (no torch, no GPU). Units: memory is bytes; the request's ``*_gb``
inputs are GiB (:data:`GiB` = 2**30 bytes), so ``gpu_memory_gb`` is read as GiB (an "80 GB" H100
reports 81,559 MiB ≈ 79.6 GiB, which the default ``reserved_gb`` absorbs). Parameter counts come
from :mod:`megatron_dapo.launch.param_count`; the request type (:class:`PlanRequest`) is defined here; the
search over layouts is in :mod:`megatron_dapo.launch.planner`, which re-exports every public name defined here.

Formulas and their sources
--------------------------
**Weights, gradients, optimizer state** (Megatron-LM ``megatron/training/theoretical_memory_usage.py``,
``compute_weight_and_optimizer_memory``): bf16 parameters (2 B) + fp32 gradient buffer (4 B) + fp32
master copy and Adam ``m``/``v`` (12 B) = 18 B/param without the distributed optimizer, and
``6 + 12/DP`` B/param with it (the 12 B are sharded over the data-parallel group; Megatron-core shards
over DP×CP). fp32 parameters: 4 + 4 + 8 (Adam only) = 16, or ``8 + 8/DP``. Optimizer CPU offload moves
the sharded optimizer bytes to host memory. Counts are those of the most loaded stage (which holds the
embedding or output layer), as in Megatron's "most loaded model shard".

**Activations** (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", arXiv 2205.05198, section 4 / Table 2). For a micro-batch of ``s·b`` tokens, 2-byte
activations, per layer: ``sbh(34 + 5as/h)`` with no parallelism; ``sbh(10 + 24/t + 5as/(ht))`` with
tensor parallelism ``t``; ``sbh/t · (34 + 5as/h)`` with tensor + sequence parallelism; ``34·sbh/t`` with
selective (core-attention) recomputation; ``2sbh`` (``2sbh/t`` with SP) per layer with full
recomputation. :func:`activation_bytes_per_layer` re-derives those terms term by term for modern
layers, and reduces exactly to the paper's formulas for a GPT layer (``f = 4h``, GeLU, MHA, dropout,
no flash attention; see :func:`korthikanti_activation_bytes_per_layer`):

    norm inputs 2·2sbh [SP: /t];  QKV-GEMM input 2sbh [SP: /t];  Q,K,V 2sb(ad + 2gd)/t;
    attention scores: softmax 2as²b/t + dropout mask as²b/t + dropout output 2as²b/t (none with flash
    attention, which keeps only a 4asb/t fp32 log-sum-exp); attention output 2sb·ad/t;
    MLP-GEMM input 2sbh [SP: /t]; MLP: SwiGLU 2sb·2f/t (fc1 output) + 2sbf/t (fc2 input), GeLU 4sbf/t;
    dropout masks sbh per block [SP: /t] when dropout is used (Qwen2/Llama train without dropout).

Pipeline schedule (Megatron ``compute_activation_memory``): the first 1F1B stage keeps ``PP``
micro-batches in flight, so it stores activations of ``L`` layers regardless of PP; the interleaved
schedule multiplies this by ``1 + (PP-1)/(PP·VPP)``; fewer micro-batches than PP reduce it. Here every
stage ``r`` is evaluated (non-interleaved: ``min(PP-r, m)`` micro-batches of ``L/PP`` layers;
interleaved: ``2(PP-1-r) + (VPP-1)·PP + 1`` chunk-micro-batches of ``L/(PP·VPP)`` layers, which gives
Megatron's factor for ``r = 0``) and the peak stage is reported. Context parallelism divides the
per-GPU tokens by CP. The first stage adds Megatron's 8 B/token of input ids; the last stage adds the
output-layer input and the logits: ``2·T·V_pad/t`` (bf16 GEMM output) plus ``12·c·V_pad/t`` fp32
working memory for a ``c``-token log-softmax chunk (``actor.logprob_chunk_size``) — an assumption about
the chunked logprob/entropy kernel, stated here because Megatron's own ``4sbh(1 + V/h)`` assumes a
full fp32 cross-entropy.

**MoE** (expert weights on the expert grid, see :mod:`megatron_dapo.launch.param_count`): a GPU holds its
dense part (TP/PP shard) plus one expert shard ``L_moe·(E/EP)·3h·f_e/ETP``. Weights and gradients count both.
The distributed optimizer shards each over its own data-parallel group (megatron-core
``DistributedOptimizer``: dense buffers over the DP×CP group, expert buffers over the expert-data-parallel
group): ``12·dense/(DP·CP) + 12·expert/EDP`` bytes, ``EDP = world/(ETP·EP·PP)``.
A MoE layer's MLP activations replace the dense ``6sbf/t`` term (:func:`moe_mlp_activation_bytes`). With
``T`` = tokens entering this GPU's router (``s·b``, ``/t`` under sequence parallelism), top-``k`` routing
and balanced experts (every GPU receives its share ``T·k`` of routed token copies, the planning
assumption; real imbalance adds to it, see ``moe_expert_capacity_factor`` in megatron-core):

    router: bf16 logits + fp32 softmax scores, 6·T·E (kept for the softmax backward)
    expert input (dispatched tokens): 2·T·k·ETP·h (kept for the fc1 weight gradient; the ETP group
        all-gathers its tokens, megatron-core ``gather_from_sequence_parallel_region`` over ``expt_tp``)
    SwiGLU experts: 2·T·k·ETP·(2f_e + f_e)/ETP = 6·T·k·f_e (fc1 output, fc2 input)
    combine: expert output 2·T·k·h (kept by the probability-weighted unpermute for the scores' gradient)

plus a transient buffer of the dispatcher, alive for one layer at a time (counted once per GPU):
``alltoall`` permutes the ``T·k`` routed copies into a send buffer of ``2·T·k·h`` bytes before the
all-to-all over EP (megatron-core 0.16 ``moe/token_dispatcher.py``, ``MoEAlltoAllTokenDispatcher.
dispatch_preprocess``/``token_dispatch``); ``allgather`` all-gathers every token of the ETP×EP group with its
routing scores before selecting the local experts' tokens, ``T·ETP·EP·(2h + 4E + E)`` bytes (bf16 hidden,
fp32 probabilities, bool routing map; ``MoEAllGatherTokenDispatcher.token_dispatch``). The dispatcher
choice is a trade: the all-gather buffer grows with EP, the all-to-all one with top-k. A model mixing
dense and MoE layers is planned at the larger of the two per-layer activation sizes (an upper bound).

**Colocated rollout** (SGLang ``--mem-fraction-static``: the fraction of total GPU memory for the
engine's weights plus KV-cache pool): ``KV pool = frac·M - params·2/engine_TP`` and
``KV bytes/token/GPU = 2 · L · g · d · 2 / engine_TP`` (K and V, bf16; with engine_TP > g each GPU keeps
one replicated KV head, so ``g/engine_TP`` is rounded up to 1). MoE engines hold every expert in each
engine replica: SGLang shards the experts over the engine's TP ranks either way (tensor-parallel experts
split ``f_e`` over TP; with ``--ep-size`` = engine TP each GPU holds ``E/EP`` whole experts, ``moe_tp =
TP/EP``), so the weight bytes per GPU are ``params·2/engine_TP`` with or without engine EP. During rollout
the trainer keeps its weights/gradients/optimizer resident unless ``actor.offload`` moves them to host
memory; during training the engine keeps only its non-static overhead (``--enable-memory-saver`` releases
weights and KV cache).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from megatron_dapo.launch.param_count import Arch, ParamCount, PlanError, count_parameters

GiB = float(2 ** 30)


# --------------------------------------------------------------------------- the request

@dataclass
class PlanRequest:
    """Inputs of :func:`plan`. Lengths are tokens, memory GiB, fractions in (0, 1)."""

    hf_config: Mapping[str, Any] | str | Path | Arch
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    max_prompt_length: int = 2048
    max_response_length: int = 20480
    colocated: bool = True
    sglang_mem_fraction: float = 0.6
    sglang_tp: Optional[int] = None
    """Engine tensor parallelism; ``None``: smallest power of two whose weights take <= half the static pool."""
    token_budgets: Optional[Sequence[int]] = None
    """``None``: 1, 2 and 4 full sequences (prompt + response)."""
    ppo_mini_batch_size: Optional[int] = 512
    """Responses per optimizer step; DP must divide it. ``None`` skips the check."""
    params_dtype: str = "bf16"
    distributed_optimizer: bool = True
    sequence_parallel: bool = True
    flash_attention: bool = True
    make_vocab_size_divisible_by: int = 128
    logprob_chunk_size: int = 1024
    reserved_gb: float = 5.0
    """Trainer memory outside the model: CUDA context, NCCL buffers, allocator fragmentation."""
    engine_overhead_gb: float = 3.0
    """Colocated SGLang memory outside its static pool (context, CUDA graphs), kept while paused."""
    max_tp: Optional[int] = None
    """Largest TP (default ``gpus_per_node``: TP stays inside one NVLink domain)."""
    max_pp: int = 16
    cp_sizes: Sequence[int] = (1, 2, 4, 8)
    vpp_sizes: Sequence[Optional[int]] = (None, 2, 4)
    recompute_options: Sequence[str] = ("none", "selective", "full")
    allow_optimizer_offload: bool = True
    num_microbatches: Optional[int] = None
    """Micro-batches per optimizer step per DP rank; ``None`` estimates it from ``ppo_mini_batch_size``."""
    ep_sizes: Optional[Sequence[int]] = None
    """MoE: expert-parallel sizes to try; ``None``: every divisor of ``num_experts`` with ``EP·ETP`` inside one
    node (<= ``gpus_per_node``: the all-to-all stays on NVLink). Ignored for dense models."""
    etp_sizes: Sequence[Optional[int]] = (1, None)
    """MoE: expert tensor-parallel sizes to try; ``None`` stands for ETP = TP (megatron-core's default)."""
    moe_token_dispatcher: str = "alltoall"
    """MoE: ``alltoall`` (the GPU default) or ``allgather``; sizes the dispatcher buffers."""
    sglang_ep: int = 1
    """MoE engines' expert parallelism (SGLang ``--ep-size``, must divide the engine TP); weight bytes per GPU
    are the same either way (see the module doc), it is checked and reported."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def max_seq_len(self) -> int:
        return self.max_prompt_length + self.max_response_length



# --------------------------------------------------------------------------- activations


def korthikanti_activation_bytes_per_layer(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                                           recompute: Optional[str] = None) -> float:
    """Korthikanti et al. 2022 (arXiv 2205.05198) Table 2, bytes per GPT layer, 2-byte activations.

    ``recompute``: ``None``, ``"selective"`` (core attention) or ``"full"``. Used to cross-check
    :func:`activation_bytes_per_layer`.
    """
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    if recompute == "selective":
        return 34 * sbh / t if sp else sbh * (10 + 24 / t)
    if sp:
        return sbh / t * (34 + 5 * a * s / h)
    return sbh * (10 + 24 / t + 5 * a * s / (h * t))


MOE_TOKEN_DISPATCHERS = ("alltoall", "allgather")


def moe_mlp_activation_bytes(arch: Arch, tokens: float, ep: int = 1, etp: int = 1,
                             dispatcher: str = "alltoall") -> tuple[float, float]:
    """(kept, transient) bytes of one MoE layer's MLP on one GPU for ``tokens`` tokens entering its router
    (after the CP and sequence-parallel splits), balanced routing; formulas and sources in the module doc.

    ``kept``: saved for the backward pass (router scores, dispatched expert inputs, SwiGLU expert
    activations, the expert outputs the combine keeps). ``transient``: the dispatcher's send / all-gather
    buffer, alive for one layer at a time. Raises PlanError for an unknown ``dispatcher``.
    """
    if dispatcher not in MOE_TOKEN_DISPATCHERS:
        raise PlanError(f"moe_token_dispatcher_type={dispatcher!r} must be one of {', '.join(MOE_TOKEN_DISPATCHERS)}")
    t, h, k, e, f = tokens, arch.hidden_size, arch.moe_topk, arch.num_experts, arch.moe_ffn_hidden_size
    kept = 6.0 * t * e + 2.0 * t * k * etp * h + 6.0 * t * k * f + 2.0 * t * k * h
    if dispatcher == "alltoall":
        transient = 2.0 * t * k * h
    else:
        transient = t * etp * ep * (2.0 * h + 5.0 * e)
    return kept, transient


def activation_bytes_per_layer(arch: Arch, seq_len: int, micro_batch: int = 1, tp: int = 1,
                               sequence_parallel: bool = False, recompute: Optional[str] = None,
                               flash_attention: bool = True, moe: bool = False, ep: int = 1, etp: int = 1,
                               dispatcher: str = "alltoall") -> float:
    """Activation bytes one GPU keeps for one transformer layer and one micro-batch (see module doc).

    ``seq_len`` × ``micro_batch`` tokens reach this GPU (after any CP split); ``recompute`` is ``None``/
    ``"none"``, ``"selective"`` (core attention recomputed: score terms dropped) or ``"full"`` (only the
    layer input is kept). ``moe``: a MoE layer, whose MLP term is the ``kept`` part of
    :func:`moe_mlp_activation_bytes` at EP ``ep``, ETP ``etp``. Returns bytes (float).
    """
    s, b, h, t = seq_len, micro_batch, arch.hidden_size, tp
    sp_div = t if sequence_parallel else 1
    a, f = arch.num_attention_heads, arch.ffn_hidden_size
    if recompute == "full":
        return 2 * s * b * h / sp_div
    replicated = (2 * 2 + 2 + 2) * s * b * h  # two norm inputs, QKV-GEMM input, MLP-GEMM input
    if arch.dropout:
        replicated += 2 * s * b * h  # two 1-byte dropout masks
    sharded = 2 * s * b * (arch.q_size + 2 * arch.kv_size)  # Q, K, V
    sharded += 2 * s * b * arch.q_size  # attention output = out-projection input
    moe_kept = 0.0
    if moe:
        moe_kept = moe_mlp_activation_bytes(arch, s * b / sp_div, ep, etp, dispatcher)[0]
    else:
        sharded += (6 if arch.gated_mlp else 4) * s * b * f
    if recompute != "selective":
        if flash_attention:
            sharded += 4 * a * s * b  # fp32 log-sum-exp per head and token
        else:
            sharded += 2 * a * s * s * b + ((3 * a * s * s * b) if arch.dropout else 0)
    return replicated / sp_div + sharded / t + moe_kept


# --------------------------------------------------------------------------- layouts and estimates


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: Optional[int]
    cp: int
    dp: int
    token_budget: int
    """Tokens per micro-batch per model replica (``actor.max_tokens_per_gpu``); each GPU of a CP group
    holds ``token_budget / CP`` of them."""
    recompute: str
    """``none``, ``selective`` or ``full``."""
    optimizer_offload: bool
    sequence_parallel: bool
    ep: int = 1
    """MoE: expert model parallelism (1 for dense models)."""
    etp: Optional[int] = None
    """MoE: expert tensor parallelism; ``None``: TP (megatron-core's default)."""
    dispatcher: str = "alltoall"
    """MoE: the token dispatcher (``alltoall`` / ``allgather``)."""

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def expert_dp(self) -> int:
        """Expert-data-parallel size ``world / (ETP·EP·PP)``, world = ``TP·PP·CP·DP``."""
        return (self.tp * self.pp * self.cp * self.dp) // (self.expert_tp * self.ep * self.pp)

    def describe(self) -> str:
        moe = f"EP={self.ep} ETP={self.expert_tp} " if self.ep > 1 or self.etp is not None else ""
        return (f"TP={self.tp} PP={self.pp} VPP={self.vpp or '-'} CP={self.cp} DP={self.dp} {moe}"
                f"tokens={self.token_budget} recompute={self.recompute} opt_offload={self.optimizer_offload}")


@dataclass
class MemoryEstimate:
    """Per-GPU bytes on the peak pipeline stage (``peak_stage``) during training, plus rollout-phase facts."""

    peak_stage: int
    params_per_gpu: int
    weights: float
    grads: float
    optimizer: float
    optimizer_host: float
    activations: float
    logits: float
    reserved: float
    engine_idle: float
    train_total: float
    trainer_resident_during_rollout: float
    rollout_offload_required: bool
    engine_tp: int
    engine_weights: float
    kv_bytes_per_token: float
    kv_pool: float
    kv_tokens_per_engine: int
    num_microbatches: int
    pipeline_bubble: float
    expert_params_per_gpu: int = 0
    """MoE: the routed-expert parameters inside ``params_per_gpu``."""
    dispatcher_buffer: float = 0.0
    """MoE: the dispatcher's transient buffer, included in ``activations``."""


def kv_cache_bytes_per_token(arch: Arch, engine_tp: int = 1, dtype_bytes: int = 2) -> float:
    """KV-cache bytes per token on one GPU of an engine: ``2 · L · g · d · bytes / engine_TP``, with
    ``g / engine_TP`` rounded up to 1 when the engine replicates KV heads (engine_TP > g)."""
    kv_heads_per_gpu = max(1, math.ceil(arch.num_query_groups / engine_tp))
    return float(2 * arch.num_layers * kv_heads_per_gpu * arch.head_dim * dtype_bytes)


def auto_engine_tp(arch: Arch, req: PlanRequest) -> int:
    """Smallest power-of-two TP (dividing heads and ``gpus_per_node``) whose bf16 weights take at most
    half of SGLang's static pool; ``gpus_per_node`` when none does."""
    pool = req.sglang_mem_fraction * req.gpu_memory_gb * GiB
    n = arch.num_parameters()
    tp = 1
    while tp <= req.gpus_per_node:
        if req.gpus_per_node % tp == 0 and arch.num_attention_heads % tp == 0 and n * 2 / tp <= pool / 2:
            return tp
        tp *= 2
    return req.gpus_per_node


def _in_flight_units(layout: Layout, num_layers: int, stage: int, m: int) -> float:
    """Layer×micro-batch activation units stage ``stage`` holds at its peak (1F1B / interleaved 1F1B)."""
    pp, vpp = layout.pp, layout.vpp
    if vpp is None:
        return min(pp - stage, m) * (num_layers // pp)
    chunks = min(2 * (pp - 1 - stage) + (vpp - 1) * pp + 1, m * vpp)
    return chunks * (num_layers // (pp * vpp))


def estimate_memory(arch: Arch, layout: Layout, req: PlanRequest, counts: Optional[ParamCount] = None,
                    engine_tp: Optional[int] = None) -> MemoryEstimate:
    """Per-GPU memory of ``layout`` (see module doc for every term). Returns bytes in a MemoryEstimate."""
    etp_l = layout.expert_tp if arch.is_moe else 1
    counts = counts or count_parameters(arch, layout.tp, layout.pp, layout.vpp, req.make_vocab_size_divisible_by,
                                        ep=layout.ep, etp=etp_l)
    pbytes, mbytes = (2, 12) if req.params_dtype == "bf16" else (4, 8)
    shard = layout.dp * layout.cp if req.distributed_optimizer else 1
    expert_shard = max(1, layout.expert_dp) if req.distributed_optimizer else 1
    tokens = layout.token_budget / layout.cp
    seq = req.max_seq_len
    if req.num_microbatches is not None:
        m = req.num_microbatches
    elif req.ppo_mini_batch_size:
        seqs_per_dp = math.ceil(req.ppo_mini_batch_size / layout.dp)
        m = max(1, math.ceil(seqs_per_dp * seq / layout.token_budget))
    else:
        m = 10 ** 9
    sp = layout.sequence_parallel and layout.tp > 1
    sp_div = layout.tp if sp else 1
    recompute = None if layout.recompute == "none" else layout.recompute
    kinds = sorted({arch.is_moe_layer(i) for i in range(arch.num_layers)})  # the largest layer kind is planned
    moe_kw = dict(ep=layout.ep, etp=etp_l, dispatcher=layout.dispatcher)
    per_layer = max(activation_bytes_per_layer(arch, int(tokens), 1, layout.tp, sp, recompute, req.flash_attention,
                                               moe=k, **moe_kw) for k in kinds)
    full_layer = max(activation_bytes_per_layer(arch, int(tokens), 1, layout.tp, sp, None, req.flash_attention,
                                                moe=k, **moe_kw) for k in kinds)
    buffer = moe_mlp_activation_bytes(arch, tokens / sp_div, **moe_kw)[1] if arch.is_moe else 0.0
    vpad_local = counts.padded_vocab_size / layout.tp
    best: Optional[tuple] = None
    for stage in range(layout.pp):
        params = counts.stage_params(stage)
        experts = max(r.expert_params for r in counts.ranks if r.pp_rank == stage)
        units = _in_flight_units(layout, arch.num_layers, stage, m)
        act = units * per_layer + (full_layer if layout.recompute == "full" else 0.0) + buffer
        if stage == 0:
            act += 8 * tokens * min(layout.pp, m)
        logits = 0.0
        if stage == layout.pp - 1:
            act += 2 * 2 * tokens * arch.hidden_size / sp_div  # final-norm input + output-layer input
            logits = 2 * tokens * vpad_local + 12 * min(req.logprob_chunk_size, tokens) * vpad_local
        weights = params * pbytes
        grads = params * 4.0
        opt = (params - experts) * mbytes / shard + experts * mbytes / expert_shard
        opt_gpu = 0.0 if layout.optimizer_offload else opt
        total = weights + grads + opt_gpu + act + logits
        if best is None or total > best[0]:
            best = (total, stage, params, weights, grads, opt_gpu, opt if layout.optimizer_offload else 0.0,
                    act, logits, experts)
    assert best is not None
    total, stage, params, weights, grads, opt_gpu, opt_host, act, logits, experts = best
    reserved = req.reserved_gb * GiB
    engine_idle = req.engine_overhead_gb * GiB if req.colocated else 0.0
    etp = engine_tp or auto_engine_tp(arch, req)
    kvb = kv_cache_bytes_per_token(arch, etp)
    engine_weights = arch.num_parameters() * 2.0 / etp
    pool = req.sglang_mem_fraction * req.gpu_memory_gb * GiB - engine_weights
    kv_tokens = int(max(pool, 0.0) // kvb)
    resident = weights + grads + opt_gpu
    offload_needed = False
    if req.colocated:
        rollout_use = req.sglang_mem_fraction * req.gpu_memory_gb * GiB + engine_idle + reserved + resident
        offload_needed = rollout_use > req.gpu_memory_gb * GiB
    bubble = (layout.pp - 1) / ((layout.vpp or 1) * m) if layout.pp > 1 else 0.0
    return MemoryEstimate(
        peak_stage=stage, params_per_gpu=params, weights=weights, grads=grads, optimizer=opt_gpu,
        optimizer_host=opt_host, activations=act, logits=logits, reserved=reserved, engine_idle=engine_idle,
        train_total=total + reserved + engine_idle,
        trainer_resident_during_rollout=0.0 if offload_needed else resident,
        rollout_offload_required=offload_needed, engine_tp=etp, engine_weights=engine_weights,
        kv_bytes_per_token=kvb, kv_pool=pool, kv_tokens_per_engine=kv_tokens, num_microbatches=m,
        pipeline_bubble=bubble, expert_params_per_gpu=experts, dispatcher_buffer=buffer)
