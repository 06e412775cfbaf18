"""Analytic parameter counts of the Megatron-core GPT model, per (pipeline stage, tensor rank).

Everything here is analytic (no torch, no GPU); counts are elements, not bytes. Used by the
memory formulas (:mod:`megatron_dapo.launch.memory`) and the layout planner
(:mod:`megatron_dapo.launch.planner`), which re-exports every public name defined here.

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

**MoE** (Qwen3-MoE; ``E`` routed experts of FFN size ``f_e``, top-``k`` routing): a MoE layer replaces the
dense MLP by a router ``E·h`` (replicated on every TP rank: megatron-core's ``TopKRouter.weight`` is not
partitioned) and ``E`` SwiGLU experts of ``3·h·f_e`` each. Expert weights live on the *expert* grid
``ETP × EP × EDP × PP`` (megatron-core ``parallel_state`` "expert" groups): a rank holds ``E/EP`` experts,
each split ``f_e/ETP`` (fc1 column-, fc2 row-parallel over ETP), i.e. ``L_moe·(E/EP)·3·h·f_e/ETP`` expert
parameters, the same on every rank of a stage. They are replicated over the expert-data-parallel group
``EDP = world / (ETP·EP·PP)``; everything else (the *dense* part: attention, norms, router, embeddings, dense
MLPs) lives on the usual ``TP × CP × DP × PP`` grid. :class:`RankParams` therefore reports, per (pipeline
stage, TP rank), the dense part as before plus ``expert_params`` (the one EP/ETP shard that GPU holds); the
HF total is ``sum over rows of (unique - expert_params) + sum over stages of expert_params·EP·ETP``.
Active parameters per token (:meth:`Arch.num_active_parameters`): the model with only ``k`` experts per
MoE layer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import MegatronDapoError
from ..models.hf_config import UnsupportedModelError, spec_from_hf_config


class PlanError(MegatronDapoError, ValueError):
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
    num_experts: int = 0
    """Routed experts per MoE layer (0: dense model)."""
    moe_topk: int = 0
    """Experts per token (HF ``num_experts_per_tok``)."""
    moe_ffn_hidden_size: int = 0
    """FFN size of one routed expert (HF ``moe_intermediate_size``)."""
    moe_layers: tuple[bool, ...] = ()
    """Per decoder layer: True where the MLP is a MoE block (empty for dense models)."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

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
        ``attention_bias`` overrides). MoE configs (``num_experts`` or ``num_local_experts`` set) are read by
        :func:`megatron_dapo.models.hf_config.spec_from_hf_config` (experts, top-k, expert FFN size, the
        per-layer MoE/dense pattern). Raises PlanError naming a missing or non-positive field or an
        unsupported MoE field.
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
        moe: dict[str, Any] = {}
        if cfg.get("num_experts") or cfg.get("num_local_experts"):
            try:
                spec = spec_from_hf_config(cfg)
            except (UnsupportedModelError, KeyError, TypeError, ValueError) as e:
                raise PlanError(f"hf_config: {e}") from None
            moe = dict(num_experts=spec.num_experts, moe_topk=spec.moe_topk,
                       moe_ffn_hidden_size=spec.moe_ffn_hidden_size, moe_layers=tuple(spec.moe_layers))
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
            qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
            **moe,
        )

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based, global) has a MoE MLP."""
        return bool(self.moe_layers) and self.moe_layers[layer]

    def layer_params(self, moe: bool = False) -> tuple[int, int]:
        """(TP-sharded, TP-replicated) dense parameters of one transformer layer, unsharded totals.

        ``moe=True``: a MoE layer, whose MLP contributes only its router ``E·h`` (replicated); its experts are
        :meth:`expert_params_per_layer`.
        """
        h, f = self.hidden_size, self.ffn_hidden_size
        qkv_out = self.q_size + 2 * self.kv_size
        sharded = h * qkv_out + (qkv_out if self.qkv_bias else 0) + self.q_size * h
        replicated = 2 * h + (2 * self.head_dim if self.qk_layernorm else 0)
        if moe:
            replicated += self.num_experts * h
        else:
            sharded += h * f * (2 if self.gated_mlp else 1) + f * h
        return sharded, replicated

    def expert_params_per_layer(self) -> int:
        """Routed-expert parameters of one MoE layer, all experts, unsharded: ``E · 3 · h · f_e`` (SwiGLU)."""
        return self.num_experts * (3 if self.gated_mlp else 2) * self.hidden_size * self.moe_ffn_hidden_size

    def num_parameters(self) -> int:
        """Exact parameter count of the unpadded HF model (all experts)."""
        emb = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        total = emb + self.hidden_size
        for i in range(self.num_layers):
            moe = self.is_moe_layer(i)
            total += sum(self.layer_params(moe)) + (self.expert_params_per_layer() if moe else 0)
        return total

    def num_active_parameters(self) -> int:
        """Parameters one token uses: :meth:`num_parameters` with ``moe_topk`` of the ``E`` experts per MoE
        layer (equal to :meth:`num_parameters` for dense models)."""
        if not self.is_moe:
            return self.num_parameters()
        unused = self.num_moe_layers * self.expert_params_per_layer() * (self.num_experts - self.moe_topk)
        return self.num_parameters() - unused // self.num_experts


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
    that this report attributes to that other rank (norms and MoE routers on TP ranks > 0; the tied output
    copy). ``expert_params`` (MoE) are the routed-expert parameters inside ``params``: one (EP, ETP) shard,
    the same on every rank of the stage (see the module doc)."""

    pp_rank: int
    tp_rank: int
    layers: tuple[int, ...]
    params: int
    padding_params: int
    duplicate_params: int
    breakdown: dict[str, int] = field(default_factory=dict, compare=False)
    expert_params: int = 0

    @property
    def unique_params(self) -> int:
        return self.params - self.padding_params - self.duplicate_params

    @property
    def dense_params(self) -> int:
        """``params`` less the expert shard: what lives on the TP × DP × PP grid."""
        return self.params - self.expert_params


@dataclass(frozen=True)
class ParamCount:
    """Result of :func:`count_parameters`."""

    total: int
    """HF parameter count (no padding, tied weights once)."""
    padded_vocab_size: int
    padding_rows: int
    ranks: list[RankParams]
    ep: int = 1
    etp: int = 1
    """Expert model / expert tensor parallel sizes the expert shards were counted for (1, 1 for dense)."""
    active: int = 0
    """Parameters one token uses (HF count with top-k of the experts; ``total`` for dense models)."""

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


def check_ep(arch: Arch, ep: int, etp: int) -> None:
    """Raise PlanError when EP does not divide the routed experts or ETP the expert FFN size (or EP/ETP > 1
    on a dense model); one line naming ``expert_model_parallel_size`` / ``expert_tensor_parallel_size``."""
    if ep < 1 or etp < 1:
        raise PlanError(f"EP={ep}, ETP={etp}: expert_model_parallel_size and expert_tensor_parallel_size must be >= 1")
    if not arch.is_moe:
        if ep > 1 or etp > 1:
            raise PlanError(f"expert_model_parallel_size={ep}, expert_tensor_parallel_size={etp}: {arch.name} is not "
                            f"a MoE model (no num_experts)")
        return
    if arch.num_experts % ep:
        raise PlanError(f"expert_model_parallel_size (EP)={ep} does not divide num_experts={arch.num_experts}")
    if arch.moe_ffn_hidden_size % etp:
        raise PlanError(f"expert_tensor_parallel_size (ETP)={etp} does not divide "
                        f"moe_intermediate_size={arch.moe_ffn_hidden_size}")


def count_parameters(hf_config: Mapping[str, Any] | str | Path | Arch, tp: int, pp: int,
                     vpp: Optional[int] = None, make_vocab_size_divisible_by: int = 128, ep: int = 1,
                     etp: Optional[int] = None) -> ParamCount:
    """Per-rank parameter counts of the Megatron-core model for a (TP, PP, VPP, EP, ETP) layout.

    Returns :class:`ParamCount` with one :class:`RankParams` per (pp_rank, tp_rank), row-major in PP.
    ``sum(r.unique_params - r.expert_params for r in ranks) + sum over stages of expert_params·EP·ETP ==
    total`` (the HF count: each row's expert shard is one of the stage's ``EP·ETP`` distinct shards; for
    dense models ``sum(r.unique_params) == total``). Vocab padding rows sit at the end
    of the vocab-parallel partition (the last TP ranks hold them) and are reported separately. ``etp``
    ``None`` means TP (megatron-core's default). Raises PlanError when TP/PP/VPP do not divide heads,
    query groups, FFN size or layers, or EP/ETP the experts (:func:`check_ep`).
    """
    arch = hf_config if isinstance(hf_config, Arch) else Arch.from_hf_config(hf_config)
    check_tp(arch, tp)
    etp = (tp if arch.is_moe else 1) if etp is None else etp
    check_ep(arch, ep, etp)
    stages = stage_layers(arch.num_layers, pp, vpp)
    h = arch.hidden_size
    vpad = padded_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by)
    rows = vpad // tp
    kinds = {moe: arch.layer_params(moe) for moe in (False, True)}
    expert_shard = arch.expert_params_per_layer() // (ep * etp) if arch.is_moe else 0
    ranks = []
    for p, layers in enumerate(stages):
        n_moe = sum(arch.is_moe_layer(i) for i in layers)
        layer_total = sum(kinds[arch.is_moe_layer(i)][0] // tp + kinds[arch.is_moe_layer(i)][1] for i in layers)
        layer_repl = sum(kinds[arch.is_moe_layer(i)][1] for i in layers)
        experts = n_moe * expert_shard
        for t in range(tp):
            lo, hi = t * rows, (t + 1) * rows
            pad_rows = max(0, hi - max(lo, arch.vocab_size))
            bd: dict[str, int] = {"layers": layer_total}
            if experts:
                bd["experts"] = experts
            padding = duplicate = 0
            duplicate += layer_repl if t > 0 else 0
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
            ranks.append(RankParams(p, t, layers, sum(bd.values()), padding, duplicate, bd, experts))
    out = ParamCount(arch.num_parameters(), vpad, vpad - arch.vocab_size, ranks, ep, etp,
                     arch.num_active_parameters())
    # every (pp, tp) rank's dense part once, and each stage's EP·ETP distinct expert shards once
    unique = sum(r.unique_params - r.expert_params for r in ranks)
    unique += sum(ep * etp * next(r.expert_params for r in ranks if r.pp_rank == p) for p in range(pp))
    if unique != out.total:  # internal consistency; a mismatch means a formula above is wrong
        raise AssertionError(f"per-rank unique params {unique} != model total {out.total}")
    return out
