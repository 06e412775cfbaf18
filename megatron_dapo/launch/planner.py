"""Parallelism planner: which (TP, PP, VPP, CP, token budget, recompute, offload) layouts fit in GPU memory.

Everything here is analytic (no torch, no GPU). Units: parameter counts are elements; memory is bytes
internally and GiB (2**30 bytes) in reports; ``gpu_memory_gb`` is read as GiB (an "80 GB" H100 reports
81,559 MiB ≈ 79.6 GiB, which the default ``reserved_gb`` absorbs).

Formulas and their sources
--------------------------
**Parameters** (:func:`count_parameters`): exact element counts of the Megatron-core GPT model that
``megatron_dapo`` builds from a HF Llama/Qwen2/Qwen3 config. Per transformer layer (``h`` hidden, ``a``
heads, ``g`` query groups = KV heads, ``d`` head dim, ``f`` FFN size)::

    linear_qkv   h·(a·d + 2·g·d)  (+ a·d + 2·g·d bias for Qwen2)   column-parallel: / TP
    linear_proj  a·d·h                                              row-parallel:    / TP
    linear_fc1   h·2f (SwiGLU gate+up)                              column-parallel: / TP
    linear_fc2   f·h                                                row-parallel:    / TP
    2 RMSNorm    2h (+ 2d q/k-norm for Qwen3)                       replicated on every TP rank

plus the vocab-parallel embedding and output layer of ``V_pad × h`` (``V_pad`` = vocab rounded up to
a multiple of ``make_vocab_size_divisible_by × TP``, Megatron's ``_vocab_size_with_padding``), the
final RMSNorm ``h`` on the last stage, and — for tied embeddings with PP > 1 — a copy of the embedding
on the last stage. Layers are split evenly over PP stages; with VPP, stage ``p`` holds model chunks
``p, p+PP, ...`` of ``L/(PP·VPP)`` layers each (Megatron's interleaved schedule layout).

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

**Colocated rollout** (SGLang ``--mem-fraction-static``: the fraction of total GPU memory for the
engine's weights plus KV-cache pool): ``KV pool = frac·M - params·2/engine_TP`` and
``KV bytes/token/GPU = 2 · L · g · d · 2 / engine_TP`` (K and V, bf16; with engine_TP > g each GPU keeps
one replicated KV head, so ``g/engine_TP`` is rounded up to 1). During rollout the trainer keeps its
weights/gradients/optimizer resident unless ``actor.offload`` moves them to host memory; during
training the engine keeps only its non-static overhead (``--enable-memory-saver`` releases weights and
KV cache).

The ranking of feasible layouts is a heuristic, not a measurement: fewer optimizer offloads, then no
recomputation before full recomputation, then a smaller model-parallel group (TP·PP·CP), a smaller
pipeline bubble, and a larger token budget.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

GiB = float(2 ** 30)


class PlanError(ValueError):
    """An impossible layout or bad planner input; the message says which dimension and why."""


# --------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class Arch:
    """Transformer shape facts the planner needs (element counts, not bytes)."""

    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool = False
    qk_layernorm: bool = False
    gated_mlp: bool = True
    dropout: bool = False

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_query_groups * self.head_dim

    @classmethod
    def from_hf_config(cls, hf_config: Mapping[str, Any] | str | Path) -> "Arch":
        """Build from a HF ``config.json`` dict, file, or model directory.

        Reads ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``
        (default: heads), ``head_dim`` (default hidden/heads), ``intermediate_size``, ``vocab_size``,
        ``tie_word_embeddings`` (default false), ``model_type`` (``qwen2`` → QKV bias, ``qwen3`` → q/k norm;
        ``attention_bias`` overrides). Raises PlanError naming a missing or non-positive field.
        """
        if not isinstance(hf_config, Mapping):
            p = Path(hf_config)
            if p.is_dir():
                p = p / "config.json"
            if not p.exists():
                raise PlanError(f"--hf-config: {p} not found")
            hf_config = json.loads(p.read_text())
        cfg = dict(hf_config)

        def need(key: str, default: Optional[int] = None) -> int:
            v = cfg.get(key, default)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise PlanError(f"hf_config.{key}: expected a positive integer, got {v!r}")
            return v

        h = need("hidden_size")
        a = need("num_attention_heads")
        g = need("num_key_value_heads", a)
        d = cfg.get("head_dim") or h // a
        model_type = str(cfg.get("model_type", ""))
        qkv_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
        if a % g:
            raise PlanError(f"hf_config.num_key_value_heads={g} must divide num_attention_heads={a}")
        return cls(
            name=str(cfg.get("_name_or_path") or model_type or "model"),
            hidden_size=h,
            num_layers=need("num_hidden_layers"),
            num_attention_heads=a,
            num_query_groups=g,
            head_dim=int(d),
            ffn_hidden_size=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_layernorm=model_type == "qwen3",
        )

    def layer_params(self) -> tuple[int, int]:
        """(TP-sharded, TP-replicated) parameters of one transformer layer, unsharded totals."""
        h, f = self.hidden_size, self.ffn_hidden_size
        qkv_out = self.q_size + 2 * self.kv_size
        sharded = h * qkv_out + (qkv_out if self.qkv_bias else 0) + self.q_size * h
        sharded += h * f * (2 if self.gated_mlp else 1) + f * h
        replicated = 2 * h + (2 * self.head_dim if self.qk_layernorm else 0)
        return sharded, replicated

    def num_parameters(self) -> int:
        """Exact parameter count of the unpadded HF model."""
        sharded, replicated = self.layer_params()
        emb = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return self.num_layers * (sharded + replicated) + emb + self.hidden_size


def padded_vocab_size(vocab_size: int, tp: int, make_vocab_size_divisible_by: int = 128) -> int:
    """Megatron's ``_vocab_size_with_padding``: round up to a multiple of ``divisible_by × TP``."""
    mult = make_vocab_size_divisible_by * tp
    return -(-vocab_size // mult) * mult


# --------------------------------------------------------------------------- parameter counts


@dataclass(frozen=True)
class RankParams:
    """Parameters held by one (pipeline stage, tensor rank). ``params`` is what
    ``sum(p.numel() for p in model.parameters())`` reports on that rank; ``padding_params`` are vocab
    padding rows inside it; ``duplicate_params`` are real parameters that another rank also holds and
    that this report attributes to that other rank (norms on TP ranks > 0; the tied output copy)."""

    pp_rank: int
    tp_rank: int
    layers: tuple[int, ...]
    params: int
    padding_params: int
    duplicate_params: int
    breakdown: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def unique_params(self) -> int:
        return self.params - self.padding_params - self.duplicate_params


@dataclass(frozen=True)
class ParamCount:
    """Result of :func:`count_parameters`."""

    total: int
    """HF parameter count (no padding, tied weights once)."""
    padded_vocab_size: int
    padding_rows: int
    ranks: list[RankParams]

    def stage_params(self, pp_rank: int) -> int:
        """Largest per-TP-rank count in stage ``pp_rank`` (padding included: it occupies memory)."""
        return max(r.params for r in self.ranks if r.pp_rank == pp_rank)

    @property
    def max_rank_params(self) -> int:
        return max(r.params for r in self.ranks)

    @property
    def padding_params(self) -> int:
        return sum(r.padding_params for r in self.ranks)


def stage_layers(num_layers: int, pp: int, vpp: Optional[int] = None) -> list[tuple[int, ...]]:
    """Global layer indices on each pipeline stage (even split; interleaved chunks with ``vpp``).

    Raises PlanError when ``num_layers`` is not divisible by ``pp`` (or ``pp × vpp``).
    """
    if pp < 1 or (vpp is not None and vpp < 1):
        raise PlanError(f"PP={pp}, VPP={vpp}: must be >= 1")
    chunks = pp * (vpp or 1)
    if num_layers % chunks:
        what = f"PP×VPP={pp}×{vpp}" if vpp else f"PP={pp}"
        raise PlanError(f"{what} does not divide num_layers={num_layers}")
    per = num_layers // chunks
    out = []
    for p in range(pp):
        layers: list[int] = []
        for v in range(vpp or 1):
            c = v * pp + p
            layers.extend(range(c * per, (c + 1) * per))
        out.append(tuple(layers))
    return out


def check_tp(arch: Arch, tp: int) -> None:
    """Raise PlanError when TP does not divide attention heads, query groups or the FFN size."""
    if tp < 1:
        raise PlanError(f"TP={tp}: must be >= 1")
    if arch.num_attention_heads % tp:
        raise PlanError(f"TP={tp} does not divide num_attention_heads={arch.num_attention_heads}")
    if arch.num_query_groups % tp:
        raise PlanError(f"TP={tp} does not divide num_query_groups (KV heads)={arch.num_query_groups}")
    if arch.ffn_hidden_size % tp:
        raise PlanError(f"TP={tp} does not divide ffn_hidden_size={arch.ffn_hidden_size}")


def count_parameters(hf_config: Mapping[str, Any] | str | Path | Arch, tp: int, pp: int,
                     vpp: Optional[int] = None, make_vocab_size_divisible_by: int = 128) -> ParamCount:
    """Per-rank parameter counts of the Megatron-core model for a (TP, PP, VPP) layout.

    Returns :class:`ParamCount` with one :class:`RankParams` per (pp_rank, tp_rank), row-major in PP.
    ``sum(r.unique_params for r in ranks) == total`` (the HF count). Vocab padding rows sit at the end
    of the vocab-parallel partition (the last TP ranks hold them) and are reported separately.
    Raises PlanError when TP/PP/VPP do not divide heads, query groups, FFN size or layers.
    """
    arch = hf_config if isinstance(hf_config, Arch) else Arch.from_hf_config(hf_config)
    check_tp(arch, tp)
    stages = stage_layers(arch.num_layers, pp, vpp)
    h = arch.hidden_size
    vpad = padded_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by)
    rows = vpad // tp
    sharded, replicated = arch.layer_params()
    ranks = []
    for p, layers in enumerate(stages):
        for t in range(tp):
            lo, hi = t * rows, (t + 1) * rows
            pad_rows = max(0, hi - max(lo, arch.vocab_size))
            bd: dict[str, int] = {"layers": len(layers) * (sharded // tp + replicated)}
            padding = duplicate = 0
            duplicate += (len(layers) * replicated) if t > 0 else 0
            if p == 0:
                bd["embedding"] = rows * h
                padding += pad_rows * h
            if p == pp - 1:
                bd["final_norm"] = h
                duplicate += h if t > 0 else 0
                if not arch.tied_embeddings or pp > 1:
                    bd["output_layer"] = rows * h
                    padding += pad_rows * h
                    if arch.tied_embeddings:  # copy of the stage-0 embedding, kept in sync by Megatron
                        duplicate += (rows - pad_rows) * h
            ranks.append(RankParams(p, t, layers, sum(bd.values()), padding, duplicate, bd))
    out = ParamCount(arch.num_parameters(), vpad, vpad - arch.vocab_size, ranks)
    unique = sum(r.unique_params for r in ranks)
    if unique != out.total:  # internal consistency; a mismatch means a formula above is wrong
        raise AssertionError(f"per-rank unique params {unique} != model total {out.total}")
    return out


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


def activation_bytes_per_layer(arch: Arch, seq_len: int, micro_batch: int = 1, tp: int = 1,
                               sequence_parallel: bool = False, recompute: Optional[str] = None,
                               flash_attention: bool = True) -> float:
    """Activation bytes one GPU keeps for one transformer layer and one micro-batch (see module doc).

    ``seq_len`` × ``micro_batch`` tokens reach this GPU (after any CP split); ``recompute`` is ``None``/
    ``"none"``, ``"selective"`` (core attention recomputed: score terms dropped) or ``"full"`` (only the
    layer input is kept). Returns bytes (float).
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
    sharded += (6 if arch.gated_mlp else 4) * s * b * f
    if recompute != "selective":
        if flash_attention:
            sharded += 4 * a * s * b  # fp32 log-sum-exp per head and token
        else:
            sharded += 2 * a * s * s * b + ((3 * a * s * s * b) if arch.dropout else 0)
    return replicated / sp_div + sharded / t


# --------------------------------------------------------------------------- planning


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

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    def describe(self) -> str:
        return (f"TP={self.tp} PP={self.pp} VPP={self.vpp or '-'} CP={self.cp} DP={self.dp} "
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


@dataclass
class Candidate:
    layout: Layout
    memory: Optional[MemoryEstimate]
    reasons: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return not self.reasons


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

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def max_seq_len(self) -> int:
        return self.max_prompt_length + self.max_response_length


@dataclass
class PlanResult:
    request: PlanRequest
    arch: Arch
    feasible: list[Candidate]
    rejected: list[Candidate]
    engine_tp: int
    kv_bytes_per_token: float

    @property
    def best(self) -> Optional[Candidate]:
        return self.feasible[0] if self.feasible else None


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
    counts = counts or count_parameters(arch, layout.tp, layout.pp, layout.vpp, req.make_vocab_size_divisible_by)
    pbytes, mbytes = (2, 12) if req.params_dtype == "bf16" else (4, 8)
    shard = layout.dp * layout.cp if req.distributed_optimizer else 1
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
    per_layer = activation_bytes_per_layer(arch, int(tokens), 1, layout.tp, sp, recompute, req.flash_attention)
    full_layer = activation_bytes_per_layer(arch, int(tokens), 1, layout.tp, sp, None, req.flash_attention)
    vpad_local = counts.padded_vocab_size / layout.tp
    best: Optional[tuple] = None
    for stage in range(layout.pp):
        params = counts.stage_params(stage)
        units = _in_flight_units(layout, arch.num_layers, stage, m)
        act = units * per_layer + (full_layer if layout.recompute == "full" else 0.0)
        if stage == 0:
            act += 8 * tokens * min(layout.pp, m)
        logits = 0.0
        if stage == layout.pp - 1:
            act += 2 * 2 * tokens * arch.hidden_size / sp_div  # final-norm input + output-layer input
            logits = 2 * tokens * vpad_local + 12 * min(req.logprob_chunk_size, tokens) * vpad_local
        weights = params * pbytes
        grads = params * 4.0
        opt = params * mbytes / shard
        opt_gpu = 0.0 if layout.optimizer_offload else opt
        total = weights + grads + opt_gpu + act + logits
        if best is None or total > best[0]:
            best = (total, stage, params, weights, grads, opt_gpu, opt if layout.optimizer_offload else 0.0, act, logits)
    assert best is not None
    total, stage, params, weights, grads, opt_gpu, opt_host, act, logits = best
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
        pipeline_bubble=bubble)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _sort_key(c: Candidate) -> tuple:
    lay, mem = c.layout, c.memory
    assert mem is not None
    return (lay.optimizer_offload, {"none": 0, "selective": 1, "full": 2}[lay.recompute], lay.model_parallel,
            round(mem.pipeline_bubble, 3), -lay.token_budget, lay.vpp or 0, mem.train_total)


def plan(req: PlanRequest) -> PlanResult:
    """Enumerate layouts for ``req``; return feasible ones ranked (see module doc) and rejected ones with
    reasons. Raises PlanError for invalid requests (non-positive sizes, a fraction outside (0, 1))."""
    if req.nodes < 1 or req.gpus_per_node < 1:
        raise PlanError(f"--nodes={req.nodes} and --gpus-per-node={req.gpus_per_node} must be >= 1")
    if req.gpu_memory_gb <= 0:
        raise PlanError(f"--gpu-memory-gb={req.gpu_memory_gb} must be > 0")
    if not 0 < req.sglang_mem_fraction < 1:
        raise PlanError(f"--sglang-mem-fraction={req.sglang_mem_fraction} must be in (0, 1)")
    if req.max_prompt_length < 1 or req.max_response_length < 1:
        raise PlanError("--max-prompt-length and --max-response-length must be >= 1")
    if req.params_dtype not in ("bf16", "fp32"):
        raise PlanError(f"params_dtype={req.params_dtype!r}: must be bf16 or fp32")
    arch = req.hf_config if isinstance(req.hf_config, Arch) else Arch.from_hf_config(req.hf_config)
    world = req.world_size
    seq = req.max_seq_len
    budgets = list(req.token_budgets or [seq, 2 * seq, 4 * seq])
    etp = req.sglang_tp or auto_engine_tp(arch, req)
    if req.sglang_tp is not None:
        if req.gpus_per_node % etp or arch.num_attention_heads % etp:
            raise PlanError(f"--sglang-tp={etp} must divide --gpus-per-node={req.gpus_per_node} "
                            f"and num_attention_heads={arch.num_attention_heads}")
    max_tp = req.max_tp or req.gpus_per_node
    feasible: list[Candidate] = []
    rejected: list[Candidate] = []
    counts_cache: dict[tuple, ParamCount] = {}
    limit = req.gpu_memory_gb * GiB

    for tp in [t for t in _divisors(req.gpus_per_node) if t <= max_tp]:
        for pp in range(1, req.max_pp + 1):
            for vpp in req.vpp_sizes:
                for cp in req.cp_sizes:
                    structural: list[str] = []
                    try:
                        check_tp(arch, tp)
                    except PlanError as e:
                        structural.append(str(e))
                    if arch.num_layers % pp:
                        structural.append(f"PP={pp} does not divide num_layers={arch.num_layers}")
                    if vpp is not None:
                        if pp < 2:
                            structural.append(f"VPP={vpp} needs PP >= 2")
                        elif arch.num_layers % (pp * vpp):
                            structural.append(f"PP×VPP={pp}×{vpp} does not divide num_layers={arch.num_layers}")
                    if world % (tp * pp * cp):
                        structural.append(f"TP×PP×CP={tp * pp * cp} does not divide {world} GPUs")
                    dp = world // (tp * pp * cp) if world % (tp * pp * cp) == 0 else 0
                    if dp and req.ppo_mini_batch_size and req.ppo_mini_batch_size % dp:
                        structural.append(f"DP={dp} does not divide ppo_mini_batch_size={req.ppo_mini_batch_size}")
                    if structural:
                        # PP values that divide neither layers nor GPUs are noise: record them only once.
                        if world % pp == 0 or arch.num_layers % pp == 0:
                            rejected.append(Candidate(Layout(tp, pp, vpp, cp, dp, 0, "-", False, False),
                                                      None, structural))
                        continue
                    key = (tp, pp, vpp)
                    if key not in counts_cache:
                        counts_cache[key] = count_parameters(arch, tp, pp, vpp, req.make_vocab_size_divisible_by)
                    for budget in budgets:
                        for recompute in req.recompute_options:
                            for offload in ([False, True] if req.allow_optimizer_offload else [False]):
                                lay = Layout(tp, pp, vpp, cp, dp, budget, recompute, offload,
                                             req.sequence_parallel and tp > 1)
                                reasons: list[str] = []
                                if budget < seq:
                                    reasons.append(f"token budget {budget} < one full sequence ({seq} tokens)")
                                if recompute == "selective" and req.flash_attention:
                                    reasons.append("selective (core-attention) recompute saves nothing with "
                                                   "flash attention; use none or full")
                                if cp > 1 and (budget // cp) % 2:
                                    reasons.append(f"token budget/CP={budget / cp:g} must be even (CP load balancing)")
                                mem = estimate_memory(arch, lay, req, counts_cache[key], etp)
                                if mem.train_total > limit:
                                    reasons.append(f"training needs {mem.train_total / GiB:.1f} GiB > "
                                                   f"{req.gpu_memory_gb:g} GiB")
                                if offload and not reasons:
                                    no_off = estimate_memory(arch, Layout(tp, pp, vpp, cp, dp, budget, recompute,
                                                                          False, lay.sequence_parallel),
                                                             req, counts_cache[key], etp)
                                    if no_off.train_total <= limit:
                                        reasons.append("optimizer offload not needed (fits without it)")
                                if req.colocated and mem.kv_tokens_per_engine < seq:
                                    reasons.append(f"SGLang KV cache holds {mem.kv_tokens_per_engine} tokens "
                                                   f"< one sequence ({seq}) at mem fraction {req.sglang_mem_fraction}")
                                if req.colocated and mem.rollout_offload_required:
                                    rollout_use = (req.sglang_mem_fraction * limit + mem.engine_idle + mem.reserved)
                                    if rollout_use > limit:
                                        reasons.append(f"rollout needs {rollout_use / GiB:.1f} GiB even with "
                                                       f"actor.offload (lower --sglang-mem-fraction)")
                                (rejected if reasons else feasible).append(Candidate(lay, mem, reasons))
    feasible.sort(key=_sort_key)
    return PlanResult(req, arch, feasible, rejected, etp, kv_cache_bytes_per_token(arch, etp))


def config_overrides(c: Candidate, req: PlanRequest) -> list[str]:
    """``key=value`` overrides for :mod:`megatron_dapo.config` that realise candidate ``c``."""
    lay, mem = c.layout, c.memory
    assert mem is not None
    out = [
        f"actor.tensor_model_parallel_size={lay.tp}",
        f"actor.pipeline_model_parallel_size={lay.pp}",
        f"actor.virtual_pipeline_model_parallel_size={lay.vpp if lay.vpp else 'null'}",
        f"actor.context_parallel_size={lay.cp}",
        f"actor.sequence_parallel={'true' if lay.sequence_parallel else 'false'}",
        f"actor.use_distributed_optimizer={'true' if req.distributed_optimizer else 'false'}",
        f"actor.recompute={'null' if lay.recompute == 'none' else lay.recompute}",
        f"actor.max_tokens_per_gpu={lay.token_budget}",
        f"actor.params_dtype={req.params_dtype}",
        f"actor.offload={'true' if mem.rollout_offload_required else 'false'}",
        f"rollout.engine_tp_size={mem.engine_tp}",
        f"rollout.mem_fraction_static={req.sglang_mem_fraction}",
        f"rollout.colocated={'true' if req.colocated else 'false'}",
    ]
    return out


def _gib(x: float) -> str:
    return f"{x / GiB:6.1f}"


def format_plan(result: PlanResult, top: int = 10, show_rejected: bool = False) -> str:
    """Human-readable report: model facts, ranked feasible layouts (GiB per GPU), the best layout's
    config overrides, and rejection reasons (counted; listed with ``show_rejected``)."""
    req, arch = result.request, result.arch
    lines = [
        f"model: {arch.name}  params={arch.num_parameters():,}  layers={arch.num_layers} hidden={arch.hidden_size} "
        f"heads={arch.num_attention_heads}/{arch.num_query_groups} ffn={arch.ffn_hidden_size} vocab={arch.vocab_size} "
        f"tied={arch.tied_embeddings}",
        f"cluster: {req.nodes} node(s) x {req.gpus_per_node} GPUs x {req.gpu_memory_gb:g} GiB; sequence = "
        f"{req.max_prompt_length} prompt + {req.max_response_length} response = {req.max_seq_len} tokens; "
        f"{'colocated' if req.colocated else 'separate'} SGLang TP={result.engine_tp} mem_fraction={req.sglang_mem_fraction}",
        f"KV cache: {result.kv_bytes_per_token:,.0f} B/token/GPU at engine TP={result.engine_tp}; "
        f"reserved {req.reserved_gb:g} GiB (trainer) + {req.engine_overhead_gb if req.colocated else 0:g} GiB "
        f"(idle engine)",
        "",
        f"{len(result.feasible)} feasible layouts (GiB per GPU, peak pipeline stage):",
        " #  TP PP VPP CP  DP  tokens  recomp  optoff  weights grads  optim  activ logits  TOTAL  "
        "act.offload  KV tok/engine  ubatches bubble",
    ]
    for i, c in enumerate(result.feasible[:top]):
        lay, m = c.layout, c.memory
        assert m is not None
        lines.append(
            f"{i + 1:2d} {lay.tp:3d} {lay.pp:2d} {str(lay.vpp or '-'):>3} {lay.cp:2d} {lay.dp:3d} {lay.token_budget:7d} "
            f"{lay.recompute:>7} {str(lay.optimizer_offload):>7} {_gib(m.weights)} {_gib(m.grads)} {_gib(m.optimizer)} "
            f"{_gib(m.activations)} {_gib(m.logits)} {_gib(m.train_total)}  {str(m.rollout_offload_required):>11} "
            f"{m.kv_tokens_per_engine:14,d} {m.num_microbatches:9d} {m.pipeline_bubble:6.2f}")
    if result.best is not None:
        lines += ["", "best layout as config overrides:", "  " + " ".join(config_overrides(result.best, req))]
    else:
        lines += ["", "no feasible layout: add nodes, lower the token budget/response length, or allow offload"]
    counts = Counter(re.sub(r"\d+(\.\d+)?", "N", r) for c in result.rejected for r in c.reasons)
    lines += ["", f"{len(result.rejected)} rejected layouts; reasons (count):"]
    for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"  {n:5d}  {reason}")
    if show_rejected:
        lines += ["", "all rejected layouts:"]
        for c in result.rejected:
            lines.append(f"  {c.layout.describe()}: {'; '.join(c.reasons)}")
    return "\n".join(lines)


def main(argv: Optional[Iterable[str]] = None) -> int:
    """``tools/plan_parallelism.py`` entry point (see ``--help``). Returns 0, or 1 when nothing fits."""
    import argparse

    ap = argparse.ArgumentParser(description="List Megatron parallel layouts that fit in GPU memory (analytic).")
    ap.add_argument("--hf-config", required=True, help="HF model directory or config.json")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0, help="per-GPU memory in GiB")
    ap.add_argument("--max-prompt-length", type=int, default=2048)
    ap.add_argument("--max-response-length", type=int, default=20480)
    ap.add_argument("--colocated", action="store_true", help="SGLang engines share the training GPUs")
    ap.add_argument("--sglang-mem-fraction", type=float, default=0.6)
    ap.add_argument("--sglang-tp", type=int, default=None)
    ap.add_argument("--token-budgets", type=str, default=None, help="comma-separated tokens per micro-batch")
    ap.add_argument("--ppo-mini-batch-size", type=int, default=512)
    ap.add_argument("--params-dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    ap.add_argument("--no-sequence-parallel", action="store_true")
    ap.add_argument("--no-flash-attention", action="store_true")
    ap.add_argument("--no-optimizer-offload", action="store_true")
    ap.add_argument("--logprob-chunk-size", type=int, default=1024)
    ap.add_argument("--reserved-gb", type=float, default=5.0)
    ap.add_argument("--engine-overhead-gb", type=float, default=3.0)
    ap.add_argument("--max-tp", type=int, default=None)
    ap.add_argument("--max-pp", type=int, default=16)
    ap.add_argument("--num-microbatches", type=int, default=None)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--show-rejected", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the best layout's overrides as JSON")
    args = ap.parse_args(list(argv) if argv is not None else None)
    budgets = None
    if args.token_budgets:
        try:
            budgets = [int(x) for x in args.token_budgets.split(",") if x.strip()]
        except ValueError:
            ap.error(f"--token-budgets: expected comma-separated integers, got {args.token_budgets!r}")
    req = PlanRequest(
        hf_config=args.hf_config, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        gpu_memory_gb=args.gpu_memory_gb, max_prompt_length=args.max_prompt_length,
        max_response_length=args.max_response_length, colocated=args.colocated,
        sglang_mem_fraction=args.sglang_mem_fraction, sglang_tp=args.sglang_tp, token_budgets=budgets,
        ppo_mini_batch_size=args.ppo_mini_batch_size or None, params_dtype=args.params_dtype,
        distributed_optimizer=not args.no_distributed_optimizer, sequence_parallel=not args.no_sequence_parallel,
        flash_attention=not args.no_flash_attention, allow_optimizer_offload=not args.no_optimizer_offload,
        logprob_chunk_size=args.logprob_chunk_size, reserved_gb=args.reserved_gb,
        engine_overhead_gb=args.engine_overhead_gb, max_tp=args.max_tp, max_pp=args.max_pp,
        num_microbatches=args.num_microbatches)
    try:
        result = plan(req)
    except PlanError as e:
        ap.error(str(e))
    if args.json:
        best = result.best
        print(json.dumps({"overrides": config_overrides(best, req) if best else [],
                          "layout": best.layout.describe() if best else None}))
    else:
        print(format_plan(result, top=args.top, show_rejected=args.show_rejected))
    return 0 if result.feasible else 1
