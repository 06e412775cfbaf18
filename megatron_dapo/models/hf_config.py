"""HF ``config.json`` → megatron-core ``TransformerConfig`` / ``GPTModel`` arguments.

Supported families (all built as megatron-core ``GPTModel`` with RMSNorm, SwiGLU, RoPE, GQA):

=============== =========================== ==========================================
family          HF architecture             specifics
=============== =========================== ==========================================
``qwen2``       ``Qwen2ForCausalLM``        QKV bias (Qwen2 / Qwen2.5)
``llama``       ``LlamaForCausalLM``        Llama 3 RoPE scaling (``rope_type: llama3``)
``qwen3``       ``Qwen3ForCausalLM``        QK-norm (RMSNorm on each head), explicit head_dim
=============== =========================== ==========================================

Fields that would change the network but have no megatron-core equivalent here are rejected with
:class:`UnsupportedModelError` naming the field (sliding-window attention, non-SiLU activations,
output-projection or MLP biases, RoPE scaling other than Llama 3's with megatron-core's fixed
low/high frequency factors 1/4 and original context 8192, MoE).
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
}


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
        layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h


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
        family = {"qwen2": "qwen2", "llama": "llama", "qwen3": "qwen3"}.get(mt)
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
    if family == "qwen3" and cfg.get("attention_bias"):
        reject("attention_bias", "Qwen3 attention biases are not supported")
    if cfg.get("num_experts") or cfg.get("num_local_experts"):
        reject("num_experts", "MoE models are not supported")
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
        qk_layernorm=family == "qwen3",
        rope_scaling_factor=rope_factor,
    )


def transformer_config_kwargs(spec: ModelSpec, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                              params_dtype: str = "fp32", sequence_parallel: bool = False,
                              context_parallel: int = 1, recompute: Optional[str] = None,
                              fp8: Optional[str] = None, fp8_recipe: str = "delayed",
                              num_layers_in_first_pipeline_stage: Optional[int] = None,
                              num_layers_in_last_pipeline_stage: Optional[int] = None,
                              on_cpu: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``megatron.core.transformer.TransformerConfig``.

    Raises:
        UnsupportedModelError: the layout does not divide heads / query groups / layers.
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
        # megatron-core rejects variable_seq_lengths with the (unused, dense model) allgather MoE dispatcher
        moe_token_dispatcher_type="alltoall",
        # gloo + interleaved schedule + batched p2p gives wrong gradients silently (measured).
        batch_p2p_comm=not (on_cpu and vpp is not None),
        deallocate_pipeline_outputs=not on_cpu,
    )
    if num_layers_in_first_pipeline_stage is not None:
        kw["num_layers_in_first_pipeline_stage"] = num_layers_in_first_pipeline_stage
    if num_layers_in_last_pipeline_stage is not None:
        kw["num_layers_in_last_pipeline_stage"] = num_layers_in_last_pipeline_stage
    if recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        kw.update(recompute_granularity="selective")
    if fp8 is not None:
        kw.update(fp8=fp8, fp8_recipe=fp8_recipe)
    return kw


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
