"""HF ``config.json`` → megatron-core ``TransformerConfig`` / ``GPTModel`` arguments.

Supported families (all built as megatron-core ``GPTModel`` with RMSNorm, SwiGLU, RoPE, GQA):

=============== =========================== ==========================================
family          HF architecture             specifics
=============== =========================== ==========================================
``qwen2``       ``Qwen2ForCausalLM``        QKV bias (Qwen2 / Qwen2.5)
``llama``       ``LlamaForCausalLM``        Llama 3 RoPE scaling (``rope_type: llama3``)
``qwen3``       ``Qwen3ForCausalLM``        QK-norm (RMSNorm on each head), explicit head_dim
``qwen3_moe``   ``Qwen3MoeForCausalLM``     Qwen3 attention; MoE MLPs (softmax router, top-k, optional
                                            top-k renormalisation ``norm_topk_prob``), dense MLPs on
                                            ``mlp_only_layers`` / off the ``decoder_sparse_step`` grid
=============== =========================== ==========================================

MoE (``qwen3_moe``) in megatron-core 0.16.1 terms (:func:`transformer_config_kwargs`):
``num_experts`` → ``num_moe_experts``, ``num_experts_per_tok`` → ``moe_router_topk``,
``moe_intermediate_size`` → ``moe_ffn_hidden_size``, the per-layer dense/MoE pattern → ``moe_layer_freq``
(a list, 1 = MoE layer). HF's router takes ``softmax`` over all experts and then the top-k; with
``norm_topk_prob`` it divides the k probabilities by their sum (transformers 5.x
``models/qwen3_moe/modeling_qwen3_moe.py``, ``Qwen3MoeTopKRouter``). That equals megatron-core's
``moe_router_pre_softmax=False`` (top-k of the logits, then softmax over those k), and without
``norm_topk_prob`` it equals ``moe_router_pre_softmax=True`` (softmax over all experts, then top-k;
``moe_utils.topk_routing_with_score_function``). HF's ``router_aux_loss_coef`` only matters with
``output_router_logits``; training adds no load-balancing loss (``moe_aux_loss_coeff=0``,
``moe_router_load_balancing_type="none"``) unless ``moe_aux_loss_coeff`` is passed.

Fields that would change the network but have no megatron-core equivalent here are rejected with
:class:`UnsupportedModelError` naming the field (sliding-window attention, non-SiLU activations,
output-projection or MLP biases, RoPE scaling other than Llama 3's with megatron-core's fixed
low/high frequency factors 1/4 and original context 8192, MoE fields outside ``qwen3_moe``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import MegatronDapoError

ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe"}


class UnsupportedModelError(MegatronDapoError, ValueError):
    """The HF config uses an architecture or a field megatron_dapo cannot build faithfully."""


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts both sides of the HF ↔ Megatron mapping need. Sizes are element counts."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    """HF vocabulary rows (``config.vocab_size``); Megatron pads it, see :meth:`padded_vocab_size`."""
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    rope_scaling_factor: Optional[float] = None
    """Llama 3 RoPE scaling factor (``None``: no scaling)."""
    num_experts: int = 0
    """Routed experts per MoE layer (0: dense model)."""
    moe_topk: int = 0
    """Experts each token is routed to (HF ``num_experts_per_tok``)."""
    moe_ffn_hidden_size: int = 0
    """Intermediate size of one routed expert (HF ``moe_intermediate_size``)."""
    moe_norm_topk_prob: bool = False
    """Renormalise the top-k router probabilities to sum to 1 (HF ``norm_topk_prob``)."""
    moe_layers: tuple[bool, ...] = ()
    """Per decoder layer: True where the MLP is a MoE block (empty for dense models)."""
    moe_layout: Optional[str] = None
    """Key of the HF ↔ Megatron MoE name table (:data:`megatron_dapo.models.mapping.MOE_LAYOUTS`)."""
    shared_expert_ffn_hidden_size: int = 0
    """Intermediate size of the shared expert (0: none; no supported family has one yet)."""
    shared_expert_gate: bool = False
    """The shared expert's output is scaled by ``sigmoid(x · w)`` (``[1, hidden]`` gate weight)."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based, global) has a MoE MLP."""
        return bool(self.moe_layers) and self.moe_layers[layer]

    def padded_vocab_size(self, tp: int, divisible_by: int = 128) -> int:
        """Vocab rounded up to a multiple of ``divisible_by × tp`` (Megatron's ``_vocab_size_with_padding``)."""
        mult = divisible_by * tp
        return int(math.ceil(self.vocab_size / mult) * mult)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def num_parameters(self) -> int:
        """Exact parameter count of the HF model (no vocabulary padding)."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q = self.num_attention_heads * d
        kv = self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if self.qkv_bias else 0) + (2 * d if self.qk_layernorm else 0)
        dense_mlp = 3 * h * f
        moe_mlp = (self.num_experts * h + self.num_experts * 3 * h * self.moe_ffn_hidden_size
                   + 3 * h * self.shared_expert_ffn_hidden_size + (h if self.shared_expert_gate else 0))
        mlps = sum(moe_mlp if self.is_moe_layer(i) else dense_mlp for i in range(self.num_layers))
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + 2 * h) + mlps + emb + h


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """Read ``config.json`` from a directory or a file path."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"HF config not found: {p}")
    return json.loads(p.read_text())


def spec_from_hf_config(cfg: dict[str, Any] | str | Path) -> ModelSpec:
    """Build a :class:`ModelSpec` from a HF config dict (or its directory / file).

    Raises:
        UnsupportedModelError: unknown architecture or an unsupported field (named in the message).
    """
    if not isinstance(cfg, dict):
        cfg = read_hf_config(cfg)
    archs = cfg.get("architectures") or []
    family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if family is None:
        mt = cfg.get("model_type")
        family = _MODEL_TYPES.get(mt)
    if family is None:
        raise UnsupportedModelError(
            f"architectures={archs} model_type={cfg.get('model_type')!r}: unsupported; "
            f"supported: {', '.join(ARCHITECTURES)}")

    def reject(field: str, why: str) -> None:
        raise UnsupportedModelError(f"{family} config field {field}={cfg.get(field)!r}: {why}")

    if cfg.get("hidden_act", "silu") != "silu":
        reject("hidden_act", "only SiLU (SwiGLU) MLPs are supported")
    if cfg.get("use_sliding_window"):
        reject("use_sliding_window", "sliding-window attention is not supported")
    if cfg.get("mlp_bias"):
        reject("mlp_bias", "MLP biases are not supported")
    if family == "llama" and cfg.get("attention_bias"):
        reject("attention_bias", "attention biases on Llama (incl. o_proj) are not supported")
    if family in ("qwen3", "qwen3_moe") and cfg.get("attention_bias"):
        reject("attention_bias", "Qwen3 attention biases are not supported")
    moe: dict[str, Any] = {}
    if family == "qwen3_moe":
        moe = _qwen3_moe_fields(cfg, reject)
    elif cfg.get("num_experts") or cfg.get("num_local_experts"):
        field = "num_experts" if cfg.get("num_experts") else "num_local_experts"
        reject(field, f"MoE is supported for {', '.join(a for a, f in ARCHITECTURES.items() if f.endswith('_moe'))}")
    rope_factor = None
    rs = cfg.get("rope_scaling")
    if rs:
        rtype = rs.get("rope_type", rs.get("type"))
        if rtype == "default":
            rs = None
        elif rtype != "llama3":
            reject("rope_scaling", "only Llama 3 RoPE scaling is supported")
        else:
            expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            for k, v in expected.items():
                if float(rs.get(k, v)) != float(v):
                    reject("rope_scaling", f"megatron-core's Llama 3 scaling fixes {k}={v}, got {rs.get(k)}")
            rope_factor = float(rs.get("factor", 8.0))
    rope_params = cfg.get("rope_parameters") or {}
    rope_theta = float(cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
    heads = int(cfg["num_attention_heads"])
    groups = int(cfg.get("num_key_value_heads") or heads)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % groups:
        raise UnsupportedModelError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
    return ModelSpec(
        family=family,
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=rope_theta,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_layernorm=family in ("qwen3", "qwen3_moe"),
        rope_scaling_factor=rope_factor,
        **moe,
    )


def _qwen3_moe_fields(cfg: dict[str, Any], reject) -> dict[str, Any]:
    """The MoE :class:`ModelSpec` fields of a ``qwen3_moe`` config (``reject(field, why)`` raises)."""
    n_exp = cfg.get("num_experts", cfg.get("num_local_experts"))
    if not isinstance(n_exp, int) or n_exp < 1:
        reject("num_experts", "must be an integer >= 1")
    topk = cfg.get("num_experts_per_tok")
    if not isinstance(topk, int) or not 1 <= topk <= n_exp:
        reject("num_experts_per_tok", f"must be an integer in [1, num_experts={n_exp}]")
    if topk == 1 and cfg.get("norm_topk_prob"):
        # HF then weights every token's expert by exactly 1; megatron-core's softmax routers cannot express that
        reject("norm_topk_prob", "with num_experts_per_tok=1 (a constant routing weight of 1) is not supported")
    moe_ffn = cfg.get("moe_intermediate_size")
    if not isinstance(moe_ffn, int) or moe_ffn < 1:
        reject("moe_intermediate_size", "must be an integer >= 1")
    step = cfg.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        reject("decoder_sparse_step", "must be an integer >= 1")
    layers = int(cfg["num_hidden_layers"])
    dense = cfg.get("mlp_only_layers") or []
    if not isinstance(dense, list) or any(not isinstance(i, int) or not 0 <= i < layers for i in dense):
        reject("mlp_only_layers", f"must be a list of layer indices in [0, num_hidden_layers={layers})")
    pattern = tuple(i not in dense and (i + 1) % step == 0 for i in range(layers))
    if not any(pattern):
        reject("mlp_only_layers", "leaves no MoE layer (with decoder_sparse_step); load it as a dense model")
    if cfg.get("shared_expert_intermediate_size"):
        reject("shared_expert_intermediate_size", "Qwen3-MoE has no shared expert; a config with one is another "
               "family (Qwen2-MoE), not supported")
    return dict(num_experts=n_exp, moe_topk=topk, moe_ffn_hidden_size=moe_ffn,
                moe_norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), moe_layers=pattern,
                moe_layout="qwen3_moe")


def transformer_config_kwargs(spec: ModelSpec, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                              params_dtype: str = "fp32", sequence_parallel: bool = False,
                              context_parallel: int = 1, recompute: Optional[str] = None,
                              fp8: Optional[str] = None, fp8_recipe: str = "delayed",
                              num_layers_in_first_pipeline_stage: Optional[int] = None,
                              num_layers_in_last_pipeline_stage: Optional[int] = None,
                              on_cpu: bool = True, ep: int = 1, etp: Optional[int] = None,
                              moe_token_dispatcher_type: Optional[str] = None,
                              moe_aux_loss_coeff: float = 0.0) -> dict[str, Any]:
    """Keyword arguments for ``megatron.core.transformer.TransformerConfig``.

    MoE models (``spec.is_moe``) also get the routed-expert fields (see the module docstring), local
    (non-grouped-GEMM) experts, expert parallelism ``ep`` / expert tensor parallelism ``etp`` (``None``: TP,
    megatron-core's default) and the token dispatcher ``moe_token_dispatcher_type`` (``None``: ``allgather``
    on CPU — the one megatron-core 0.16.1 runs on gloo — and ``alltoall`` on GPU). The ``allgather`` dispatcher
    needs fixed pipeline shapes (``variable_seq_lengths=False``). ``moe_aux_loss_coeff > 0`` enables
    megatron-core's ``aux_loss`` load balancing.

    Raises:
        UnsupportedModelError: the layout does not divide heads / query groups / layers / experts.
    """
    import torch  # heavy: torch; this module is used without it

    if spec.num_attention_heads % tp or spec.num_query_groups % tp:
        raise UnsupportedModelError(
            f"tensor_model_parallel_size={tp} must divide num_attention_heads={spec.num_attention_heads} "
            f"and num_key_value_heads={spec.num_query_groups}")
    if spec.ffn_hidden_size % tp:
        raise UnsupportedModelError(f"tensor_model_parallel_size={tp} must divide intermediate_size={spec.ffn_hidden_size}")
    if num_layers_in_first_pipeline_stage is None and num_layers_in_last_pipeline_stage is None:
        if spec.num_layers % (pp * (vpp or 1)):
            raise UnsupportedModelError(
                f"num_hidden_layers={spec.num_layers} is not divisible by PP({pp}) x VPP({vpp or 1})")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[params_dtype]
    kw: dict[str, Any] = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_layernorm,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=context_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=params_dtype == "bf16",
        attention_dropout=0.0,
        hidden_dropout=0.0,
        use_cpu_initialization=on_cpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # gloo + interleaved schedule: the shape exchange of variable-length p2p deadlocks or mismatches
        # messages (measured); the actor then pads every micro-batch to one fixed shape instead.
        variable_seq_lengths=not (on_cpu and vpp is not None),
        # megatron-core rejects variable_seq_lengths with the allgather MoE dispatcher (MoE models: below)
        moe_token_dispatcher_type="alltoall",
        # gloo + interleaved schedule + batched p2p gives wrong gradients silently (measured).
        batch_p2p_comm=not (on_cpu and vpp is not None),
        deallocate_pipeline_outputs=not on_cpu,
    )
    if num_layers_in_first_pipeline_stage is not None:
        kw["num_layers_in_first_pipeline_stage"] = num_layers_in_first_pipeline_stage
    if num_layers_in_last_pipeline_stage is not None:
        kw["num_layers_in_last_pipeline_stage"] = num_layers_in_last_pipeline_stage
    if spec.is_moe:
        kw.update(_moe_config_kwargs(spec, ep=ep, etp=etp, tp=tp, on_cpu=on_cpu,
                                     dispatcher=moe_token_dispatcher_type, aux_loss_coeff=moe_aux_loss_coeff))
        if kw["moe_token_dispatcher_type"] == "allgather":
            kw["variable_seq_lengths"] = False
    if recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        kw.update(recompute_granularity="selective")
    if fp8 is not None:
        kw.update(fp8=fp8, fp8_recipe=fp8_recipe)
    return kw


MOE_TOKEN_DISPATCHERS = ("allgather", "alltoall")


def _moe_config_kwargs(spec: ModelSpec, *, ep: int, etp: Optional[int], tp: int, on_cpu: bool,
                       dispatcher: Optional[str], aux_loss_coeff: float) -> dict[str, Any]:
    if spec.num_experts % ep:
        raise UnsupportedModelError(
            f"expert_model_parallel_size={ep} must divide num_experts={spec.num_experts}")
    etp = tp if etp is None else etp
    if spec.moe_ffn_hidden_size % etp:
        raise UnsupportedModelError(
            f"expert_tensor_parallel_size={etp} must divide moe_intermediate_size={spec.moe_ffn_hidden_size}")
    dispatcher = dispatcher or ("allgather" if on_cpu else "alltoall")
    if dispatcher not in MOE_TOKEN_DISPATCHERS:
        raise UnsupportedModelError(f"moe_token_dispatcher_type={dispatcher!r} must be one of "
                                    f"{', '.join(MOE_TOKEN_DISPATCHERS)}")
    kw: dict[str, Any] = dict(
        num_moe_experts=spec.num_experts,
        moe_router_topk=spec.moe_topk,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        # renormalised top-k == softmax over the k selected logits; plain top-k == softmax over all experts first
        moe_router_pre_softmax=not spec.moe_norm_topk_prob,
        moe_router_score_function="softmax",
        moe_layer_freq=[1 if m else 0 for m in spec.moe_layers],
        moe_grouped_gemm=False,
        moe_token_dispatcher_type=dispatcher,
        moe_aux_loss_coeff=float(aux_loss_coeff),
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff > 0 else "none",
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    if spec.shared_expert_ffn_hidden_size:
        kw.update(moe_shared_expert_intermediate_size=spec.shared_expert_ffn_hidden_size,
                  moe_shared_expert_gate=spec.shared_expert_gate)
    return kw


def layer_spec(spec: ModelSpec, tconfig: Any, *, use_te: bool = False, vp_stage: Optional[int] = None) -> Any:
    """megatron-core layer spec(s) for ``GPTModel(transformer_layer_spec=...)``.

    Dense models: one ``ModuleSpec`` (local or Transformer Engine). MoE models: megatron-core's
    ``get_gpt_decoder_block_spec`` (``TransformerBlockSubmodules`` with this pipeline stage's layers, MoE or
    dense per ``tconfig.moe_layer_freq``; local experts, no grouped GEMM). ``tconfig`` is the built
    ``TransformerConfig``; call after parallel state is initialised (the block spec depends on the stage,
    and on the virtual stage ``vp_stage`` with interleaved pipelining).
    """
    # heavy: megatron-core, imported once a model is built (after the CPU shims)
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if spec.is_moe:
        from ..cpu_shims import define_missing_te_names  # heavy: torch; this module is used without it

        define_missing_te_names()
        return specs.get_gpt_decoder_block_spec(tconfig, use_transformer_engine=use_te, normalization="RMSNorm",
                                                vp_stage=vp_stage)
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_layernorm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm, normalization="RMSNorm")


def gpt_model_kwargs(spec: ModelSpec, padded_vocab: int) -> dict[str, Any]:
    """Keyword arguments for ``megatron.core.models.gpt.GPTModel`` besides config / spec / stages."""
    kw: dict[str, Any] = dict(
        vocab_size=padded_vocab,
        max_sequence_length=spec.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(spec.rope_theta) if float(spec.rope_theta).is_integer() else spec.rope_theta,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        parallel_output=True,
    )
    if spec.rope_scaling_factor is not None:
        kw.update(rope_scaling=True, rope_scaling_factor=spec.rope_scaling_factor)
    return kw
