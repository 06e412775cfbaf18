"""Core-attention backends of the actor (``actor.attention_backend``), chosen through the layer spec.

* ``te``: Transformer Engine's ``TEDotProductAttention`` (fused kernels; needs TE importable).
* ``sdpa``: :class:`SDPAttention`, a megatron-core core-attention module that calls
  ``torch.nn.functional.scaled_dot_product_attention`` (flash / cuDNN / memory-efficient kernels on CUDA,
  the math kernel on CPU): no ``[s, s]`` score tensor, no ``[s, s]`` mask, GQA without repeating K/V.
* ``local``: megatron-core's unfused ``DotProductAttention`` (scores, mask, fp32 softmax, bmm).
* ``auto``: ``te`` when Transformer Engine imports, else ``sdpa`` (:func:`resolve_attention_backend`).

The backend replaces the ``core_attention`` submodule of the self-attention ``ModuleSpec`` of a GPT layer
spec (:func:`apply_attention_backend`); nothing is monkey-patched.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..backend import has_transformer_engine
from ..config import ATTENTION_BACKENDS, ConfigError
from ..cpu_shims import apply_cpu_shims, thd_segments_attention

apply_cpu_shims()  # before the first megatron import (a no-op with CUDA)
from megatron.core.transformer.module import MegatronModule  # noqa: E402


def resolve_attention_backend(backend: str) -> str:
    """The concrete backend for ``actor.attention_backend``.

    Args:
        backend: one of :data:`megatron_dapo.config.ATTENTION_BACKENDS`.

    Returns:
        ``"te"``, ``"sdpa"`` or ``"local"`` (``auto``: ``te`` when Transformer Engine imports, else ``sdpa``).

    Raises:
        ConfigError: (a ``ValueError``) an unknown backend, or ``te`` while Transformer Engine is not importable.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"actor.attention_backend: must be one of {', '.join(ATTENTION_BACKENDS)} (got {backend!r})")
    if backend == "auto":
        return "te" if has_transformer_engine() else "sdpa"
    if backend == "te" and not has_transformer_engine():
        raise ConfigError("actor.attention_backend: te: Transformer Engine is not importable")
    return backend


def apply_attention_backend(layer_spec, backend: str):
    """A copy of a GPT ``layer_spec`` whose self-attention uses ``backend``'s core-attention module.

    Args:
        layer_spec: megatron-core ``ModuleSpec`` of a transformer layer (``get_gpt_layer_local_spec`` or
            ``get_gpt_layer_with_transformer_engine_spec``), whose ``submodules.self_attention.submodules``
            has a ``core_attention`` field; or a block spec (``TransformerBlockSubmodules`` of
            ``get_gpt_decoder_block_spec``, or a ``ModuleSpec`` holding one): every layer is changed.
        backend: one of :data:`megatron_dapo.config.ATTENTION_BACKENDS` (see :func:`resolve_attention_backend`).

    Returns:
        A deep copy of ``layer_spec``; the input is not modified.

    Raises:
        ConfigError: see :func:`resolve_attention_backend`.
        ValueError: a spec without ``self_attention.core_attention``.
    """
    backend = resolve_attention_backend(backend)
    if backend == "te":
        # heavy: Transformer Engine, imported only when this backend is chosen
        from megatron.core.extensions.transformer_engine import TEDotProductAttention as core
    elif backend == "local":
        # heavy: megatron-core, imported once a model is built (after the CPU shims)
        from megatron.core.transformer.dot_product_attention import DotProductAttention as core
    else:
        core = SDPAttention
    spec = copy.deepcopy(layer_spec)
    _set_core_attention(spec, core)
    return spec


def _set_core_attention(spec, core) -> None:
    """Set ``core_attention`` in a layer ``ModuleSpec`` or in every layer of a block spec (in place).

    Raises:
        ValueError: ``spec`` is neither.
    """
    layers = getattr(spec, "layer_specs", None)  # TransformerBlockSubmodules (e.g. a MoE decoder block)
    if layers is None and hasattr(getattr(spec, "submodules", None), "layer_specs"):
        layers = spec.submodules.layer_specs  # ModuleSpec(TransformerBlock, TransformerBlockSubmodules)
    if layers is not None:
        for layer in layers:
            _set_core_attention(layer, core)
        return
    attn = getattr(getattr(spec, "submodules", None), "self_attention", None)
    if not hasattr(getattr(attn, "submodules", None), "core_attention"):
        raise ValueError(f"apply_attention_backend: {type(spec).__name__} has no self_attention.core_attention")
    attn.submodules.core_attention = core


class SDPAttention(MegatronModule):
    """Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Same constructor and forward signature as megatron-core 0.16.1
    ``megatron.core.transformer.dot_product_attention.DotProductAttention``
    (``megatron/core/transformer/dot_product_attention.py``); it holds no parameters. The module sees this
    tensor-parallel rank's heads (``np = num_attention_heads / TP``, ``ng = num_query_groups / TP``);
    sequence parallelism does not reach it (the QKV projection all-gathers the sequence first).

    Masking follows Transformer Engine's convention: with ``attn_mask_type`` ``causal`` the mask argument is
    ignored and the kernel's causal mask is used (the actor's rows are right-padded, so the causal mask is
    the full mask); with any other type a given ``attention_mask`` (bool, ``True`` = masked out, broadcastable
    to ``[b, np, sq, sk]``) is passed to the kernel.

    Raises:
        ValueError: (construction) context parallelism, sliding-window attention or a softmax type other than
            ``vanilla``, which this module does not implement.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        # heavy: megatron-core, imported once a model is built (after the CPU shims)
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.utils import is_layer_window_attention
        from megatron.core.utils import divide

        if config.context_parallel_size != 1:
            raise ValueError("actor.attention_backend=sdpa does not support context parallelism; use te")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError("actor.attention_backend=sdpa does not support sliding-window attention; use te")
        if config.softmax_type != "vanilla":
            raise ValueError(f"actor.attention_backend=sdpa supports softmax_type 'vanilla' only "
                             f"(got {config.softmax_type!r})")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)
        # The local module divides by layer_number and its softmax multiplies it back
        # (apply_query_key_layer_scaling): the net scale is this one.
        self.softmax_scale = (1.0 / math.sqrt(self.hidden_size_per_attention_head) if softmax_scale is None
                              else softmax_scale)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              causal: bool) -> torch.Tensor:
        """``[b, np, sq, hn]`` x ``[b, ng, sk, hn]`` -> ``[b, np, sq, hn]`` (dropout only in training)."""
        p = self.dropout_p if self.training else 0.0
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        kw = dict(attn_mask=mask, dropout_p=p, is_causal=causal and mask is None, scale=self.softmax_scale,
                  enable_gqa=gqa)
        if p > 0.0 and not self.config.sequence_parallel:
            # heavy: megatron-core, imported once a model is built (after the CPU shims)
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(q, k, v, **kw)
        return F.scaled_dot_product_attention(q, k, v, **kw)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        """Attention of this rank's heads.

        Args:
            query: ``[sq, b, np, hn]`` (or ``[t, np, hn]`` with THD ``packed_seq_params``), any float dtype.
            key, value: ``[sk, b, ng, hn]`` (or ``[t, ng, hn]``), same dtype.
            attention_mask: bool, ``True`` = masked out; ignored for causal ``attn_mask_type``.
            attn_mask_type: overrides the constructor's ``AttnMaskType`` when given.
            attention_bias: must be ``None``.
            packed_seq_params: megatron-core ``PackedSeqParams(qkv_format="thd")``: self-attention within each
                ``cu_seqlens_q`` segment (starting at ``cu_seqlens_q_padded``), causal; filler positions
                between a segment's valid tokens and the next boundary get zeros (as TE's THD kernels).

        Returns:
            ``[sq, b, np * hn]`` (or ``[t, np * hn]``), the input dtype.

        Raises:
            ValueError: an attention bias, a ``qkv_format`` other than ``thd``, different q/kv boundaries, or
                boundaries that do not fit the packed length.
        """
        # heavy: megatron-core, imported once a model is built (after the CPU shims)
        from megatron.core.transformer.enums import AttnMaskType

        if attention_bias is not None:
            raise ValueError("actor.attention_backend=sdpa does not support an attention bias")
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        if packed_seq_params is not None:
            return self._forward_thd(query, key, value, packed_seq_params, causal)
        sq, b = query.shape[:2]
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask.to(torch.bool)
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        ctx = self._sdpa(q, k, v, mask, causal)
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _forward_thd(self, query, key, value, p, causal: bool) -> torch.Tensor:
        """THD packed self-attention, one kernel call per segment (``[t, np, hn]`` -> ``[t, np * hn]``)."""
        def attend(s: int, n: int) -> torch.Tensor:
            # [n, heads, hn] -> [1, heads, n, hn] -> [n, heads, hn]
            q, k, v = (x[s: s + n].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
            return self._sdpa(q, k, v, None, causal)[0].transpose(0, 1)

        return thd_segments_attention(p, query.shape[0], self.hidden_size_per_partition, query, attend,
                                      "actor.attention_backend=sdpa")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None) -> dict:
        """No parameters: an empty sharded state dict."""
        return {}
