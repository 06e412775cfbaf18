"""Parameter mapping HF ↔ megatron-core ``GPTModel`` for Qwen2/2.5, Llama 3, Qwen3 and Qwen3-MoE.

Used by the conversion tools, the actor's HF loading, checkpoint export and engine weight sync.

Terms:

* **canonical Megatron name** — the local-layer-spec name with the *global* layer index, e.g.
  ``decoder.layers.17.self_attention.linear_qkv.weight``. Transformer Engine spec names
  (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``) map to the local spec's
  ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight`` via :func:`canonical_name`.
* **full tensor** — the TP=1 layout of a Megatron parameter, vocabulary rows padded.

Layouts (megatron-core ``SelfAttention`` / ``MLP``):

* ``linear_qkv`` rows are grouped per query group ``g``: ``[q heads of g | k_g | v_g]``, i.e. the full
  weight is ``[G, (H/G + 2)·d, hidden]`` flattened, so a TP shard is a contiguous block of groups.
* ``linear_fc1`` is ``[gate; up]`` *per TP shard*: rank ``r`` holds ``[gate_r; up_r]``.
* Word embedding / output layer are padded to ``padded_vocab`` rows (zeros); export drops them.

MoE layers (megatron-core ``MoELayer`` with local experts, ``SequentialMLP``; no grouped GEMM) follow a name
table, :data:`MOE_LAYOUTS`, one entry per MoE family: each row maps one layer-relative Megatron name to its
HF name(s), with ``{e}`` standing for the expert index. Canonical names carry the *global* expert index
``e``; on an expert-parallel rank megatron-core names its expert ``j`` (``local_experts.<j>``), global index
``ep_rank * num_local_experts + j`` (``MoELayer.local_expert_indices``, which :func:`local_params` reads), and
each EP rank holds only its own experts. Expert ``linear_fc1`` is ``[gate_e; up_e]`` like the dense MLP,
split per expert-tensor-parallel rank the same way. A next family (shared experts, expert bias) is a new
table entry plus its :class:`~megatron_dapo.models.hf_config.ModelSpec` fields.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from ..errors import MegatronDapoError
from .hf_config import ModelSpec

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# per-layer canonical suffix -> TP partition dim (None = replicated)
_LAYER_PARAMS = {
    "input_layernorm.weight": None,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.q_layernorm.weight": None,
    "self_attention.k_layernorm.weight": None,
    "self_attention.linear_proj.weight": 1,
    "pre_mlp_layernorm.weight": None,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc2.weight": 1,
}
_GLOBAL_PARAMS = {
    "embedding.word_embeddings.weight": 0,
    "decoder.final_layernorm.weight": None,
    "output_layer.weight": 0,
}
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


class MappingError(MegatronDapoError, ValueError):
    """A tensor is missing or has the wrong shape (the message names it, expected and found shapes)."""


@dataclass(frozen=True)
class MoEParam:
    """One row of a MoE name table: a layer-relative Megatron name and the HF names it is made of.

    ``{e}`` in both stands for the global expert index. Two HF names mean a fused ``[gate; up]`` Megatron
    ``linear_fc1`` (concatenated on dim 0, TP/ETP-split per half); one name is copied as is.
    """

    mcore: str
    hf: tuple[str, ...]
    shape: Callable[[ModelSpec], tuple[int, ...]]
    """Full (unsharded) Megatron shape for a spec."""
    tp_dim: Optional[int]
    """Partition dim under (expert) tensor parallelism; ``None``: replicated."""

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.mcore


def _router_shape(s: ModelSpec) -> tuple[int, ...]:
    return (s.num_experts, s.hidden_size)


def _expert_fc1_shape(s: ModelSpec) -> tuple[int, ...]:
    return (2 * s.moe_ffn_hidden_size, s.hidden_size)


def _expert_fc2_shape(s: ModelSpec) -> tuple[int, ...]:
    return (s.hidden_size, s.moe_ffn_hidden_size)


def _shared_fc1_shape(s: ModelSpec) -> tuple[int, ...]:
    return (2 * s.shared_expert_ffn_hidden_size, s.hidden_size)


def _shared_fc2_shape(s: ModelSpec) -> tuple[int, ...]:
    return (s.hidden_size, s.shared_expert_ffn_hidden_size)


_ROUTER = MoEParam("mlp.router.weight", ("mlp.gate.weight",), _router_shape, None)
_EXPERTS = (
    MoEParam("mlp.experts.local_experts.{e}.linear_fc1.weight",
             ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), _expert_fc1_shape, 0),
    MoEParam("mlp.experts.local_experts.{e}.linear_fc2.weight", ("mlp.experts.{e}.down_proj.weight",),
             _expert_fc2_shape, 1),
)

#: MoE family -> its table (``ModelSpec.moe_layout`` picks one). ``qwen3_moe`` is built end to end;
#: ``qwen2_moe`` (a gated shared expert) is a name table only: no ``ModelSpec`` is built for it yet.
MOE_LAYOUTS: dict[str, tuple[MoEParam, ...]] = {
    "qwen3_moe": (_ROUTER,) + _EXPERTS,
    "qwen2_moe": (_ROUTER,) + _EXPERTS + (
        MoEParam("mlp.shared_experts.linear_fc1.weight",
                 ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"), _shared_fc1_shape, 0),
        MoEParam("mlp.shared_experts.linear_fc2.weight", ("mlp.shared_expert.down_proj.weight",),
                 _shared_fc2_shape, 1),
        MoEParam("mlp.shared_experts.gate_weight", ("mlp.shared_expert_gate.weight",),
                 lambda s: (1, s.hidden_size), None),
    ),
}
_MOE_PATTERNS = [(re.compile("^" + re.escape(row.mcore).replace(r"\{e\}", r"(\d+)") + "$"), row)
                 for rows in MOE_LAYOUTS.values() for row in rows]
_LOCAL_EXPERT_RE = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")


def _moe_row(suffix: str) -> Optional[tuple[MoEParam, Optional[int]]]:
    """``(table row, expert index or None)`` of a layer-relative Megatron name, ``None`` if not a MoE name."""
    for pat, row in _MOE_PATTERNS:
        m = pat.match(suffix)
        if m:
            return row, (int(m.group(1)) if row.per_expert else None)
    return None


def moe_layer_suffixes(spec: ModelSpec) -> list[str]:
    """Layer-relative Megatron names of one MoE layer's MLP (every expert, global indices), in export order.

    Raises:
        MappingError: ``spec.moe_layout`` names no table of :data:`MOE_LAYOUTS`.
    """
    if spec.moe_layout not in MOE_LAYOUTS:
        raise MappingError(f"ModelSpec.moe_layout={spec.moe_layout!r} is not one of {', '.join(MOE_LAYOUTS)}")
    rows = MOE_LAYOUTS[spec.moe_layout]
    out = [r.mcore for r in rows if not r.per_expert]
    for e in range(spec.num_experts):
        out += [r.mcore.format(e=e) for r in rows if r.per_expert]
    return out


def expert_index(name: str) -> Optional[int]:
    """Global expert index of a canonical routed-expert name (``None`` for any other name)."""
    m = _LAYER_RE.match(canonical_name(name))
    found = _moe_row(m.group(2)) if m else None
    return found[1] if found else None


def expert_parallel_rank(spec: ModelSpec, name: str, ep_size: int) -> Optional[int]:
    """The expert-parallel rank holding canonical ``name`` (``None``: not a routed expert, on every EP rank)."""
    e = expert_index(name)
    return None if e is None else e // (spec.num_experts // ep_size)


def canonical_name(name: str) -> str:
    """Strip wrappers (``module.``) and map TE layer-spec names to local-spec names."""
    while name.startswith("module."):
        name = name[len("module."):]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _TE_ALIASES:
        return f"decoder.layers.{m.group(1)}.{_TE_ALIASES[m.group(2)]}"
    return name


def local_params(model: torch.nn.Module, spec: ModelSpec) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """``(canonical global name, local name, parameter)`` of every parameter of one unwrapped ``GPTModel`` stage.

    Canonical names number the decoder layers globally over the pipeline (``layer_number - 1``) and routed
    experts globally over expert parallelism (``MoELayer.local_expert_indices``); a stage's output weight tied
    to the embedding is named ``"output_layer.weight(tied)"``.
    """
    layers = list(model.decoder.layers) if hasattr(model, "decoder") else []
    layer_num = {i: layer.layer_number - 1 for i, layer in enumerate(layers)}
    for lname, p in model.named_parameters():
        cname = canonical_name(lname)
        if cname.startswith("decoder.layers."):
            m = _LOCAL_EXPERT_RE.match(cname)
            if m:
                experts = layers[int(cname.split(".")[2])].mlp.local_expert_indices
                cname = f"{m.group(1)}{experts[int(m.group(2))]}{m.group(3)}"
            parts = cname.split(".")
            parts[2] = str(layer_num[int(parts[2])])
            cname = ".".join(parts)
        if cname == "output_layer.weight" and spec.tie_word_embeddings:
            cname = "output_layer.weight(tied)"
        yield cname, lname, p


def layer_suffixes(spec: ModelSpec, layer: Optional[int] = None) -> list[str]:
    """Layer-relative canonical names of decoder layer ``layer`` (``None``: a dense layer), in export order."""
    out = ["input_layernorm.weight", "self_attention.linear_qkv.weight"]
    if spec.qkv_bias:
        out.append("self_attention.linear_qkv.bias")
    if spec.qk_layernorm:
        out += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
    out += ["self_attention.linear_proj.weight", "pre_mlp_layernorm.weight"]
    if layer is not None and spec.is_moe_layer(layer):
        return out + moe_layer_suffixes(spec)
    return out + ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]


def mcore_names(spec: ModelSpec) -> list[str]:
    """Every canonical Megatron parameter name, in export order (embedding, layers, norm, output)."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(spec.num_layers):
        names += [f"decoder.layers.{i}.{s}" for s in layer_suffixes(spec, i)]
    names.append("decoder.final_layernorm.weight")
    if not spec.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def partition_dim(name: str) -> Optional[int]:
    """TP partition dimension of a canonical name (``None`` when replicated)."""
    name = canonical_name(name)
    if name in _GLOBAL_PARAMS:
        return _GLOBAL_PARAMS[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_PARAMS:
        return _LAYER_PARAMS[m.group(2)]
    found = _moe_row(m.group(2)) if m else None
    if found is None:
        raise MappingError(f"unknown Megatron parameter {name!r}")
    return found[0].tp_dim


def full_shape(spec: ModelSpec, name: str, padded_vocab: int) -> tuple[int, ...]:
    """Shape of the full (TP=1, vocab-padded) tensor of a canonical name."""
    name = canonical_name(name)
    h, d, f = spec.hidden_size, spec.head_dim, spec.ffn_hidden_size
    qkv_rows = (spec.num_attention_heads + 2 * spec.num_query_groups) * d
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return (padded_vocab, h)
    if name == "decoder.final_layernorm.weight":
        return (h,)
    suffix = _LAYER_RE.match(name).group(2)
    moe = _moe_row(suffix)
    if moe is not None:
        return moe[0].shape(spec)
    return {
        "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": (qkv_rows, h),
        "self_attention.linear_qkv.bias": (qkv_rows,),
        "self_attention.q_layernorm.weight": (d,),
        "self_attention.k_layernorm.weight": (d,),
        "self_attention.linear_proj.weight": (h, spec.num_attention_heads * d),
        "mlp.linear_fc1.weight": (2 * f, h),
        "mlp.linear_fc2.weight": (h, f),
    }[suffix]


def hf_names_for(spec: ModelSpec, name: str) -> list[str]:
    """HF tensor names that one canonical Megatron parameter maps to (1, 2 or 3 names)."""
    name = canonical_name(name)
    if name == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"]
    if name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"]
    if name == "output_layer.weight":
        return ["lm_head.weight"]
    i, suffix = _LAYER_RE.match(name).groups()
    p = f"model.layers.{i}."
    moe = _moe_row(suffix)
    if moe is not None:
        return [p + h.format(e=moe[1]) for h in moe[0].hf]
    return {
        "input_layernorm.weight": [p + "input_layernorm.weight"],
        "pre_mlp_layernorm.weight": [p + "post_attention_layernorm.weight"],
        "self_attention.linear_qkv.weight": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
        "self_attention.linear_qkv.bias": [p + f"self_attn.{x}_proj.bias" for x in "qkv"],
        "self_attention.q_layernorm.weight": [p + "self_attn.q_norm.weight"],
        "self_attention.k_layernorm.weight": [p + "self_attn.k_norm.weight"],
        "self_attention.linear_proj.weight": [p + "self_attn.o_proj.weight"],
        "mlp.linear_fc1.weight": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
        "mlp.linear_fc2.weight": [p + "mlp.down_proj.weight"],
    }[suffix]


def hf_names(spec: ModelSpec) -> list[str]:
    """Every HF tensor name of the model, in export order."""
    return [h for n in mcore_names(spec) for h in hf_names_for(spec, n)]


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise MappingError(f"{name}: expected shape {tuple(shape)}, found {tuple(t.shape)}")


def hf_to_mcore(spec: ModelSpec, name: str, get_hf: Callable[[str], torch.Tensor], padded_vocab: int) -> torch.Tensor:
    """Full Megatron tensor for canonical ``name`` built from HF tensors fetched with ``get_hf(hf_name)``.

    ``get_hf`` raises ``KeyError`` for a missing tensor; that becomes a :class:`MappingError`.
    """
    name = canonical_name(name)
    hnames = hf_names_for(spec, name)
    if spec.tie_word_embeddings and name == "output_layer.weight":
        hnames = ["model.embed_tokens.weight"]

    def fetch(n: str) -> torch.Tensor:
        try:
            return get_hf(n)
        except KeyError:
            raise MappingError(f"HF checkpoint has no tensor {n!r} (needed for Megatron {name!r})") from None

    h, d, g = spec.hidden_size, spec.head_dim, spec.num_query_groups
    hpg = spec.heads_per_group
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        w = fetch(hnames[0])
        _check(hnames[0], w, (spec.vocab_size, h))
        out = w.new_zeros((padded_vocab, h))
        out[: spec.vocab_size] = w
        return out
    suffix = _LAYER_RE.match(name).group(2) if name.startswith("decoder.layers.") else None
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        q, k, v = (fetch(n) for n in hnames)
        tail = (h,) if suffix.endswith("weight") else ()
        _check(hnames[0], q, (spec.num_attention_heads * d,) + tail)
        _check(hnames[1], k, (g * d,) + tail)
        _check(hnames[2], v, (g * d,) + tail)
        qkv = torch.cat([q.reshape(g, hpg * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)], dim=1)
        return qkv.reshape((g * (hpg + 2) * d,) + tail).contiguous()
    moe = _moe_row(suffix) if suffix else None
    if moe is not None:
        shape = moe[0].shape(spec)
        if len(hnames) == 2:  # fused [gate; up]
            gate, up = fetch(hnames[0]), fetch(hnames[1])
            half = (shape[0] // 2,) + tuple(shape[1:])
            _check(hnames[0], gate, half)
            _check(hnames[1], up, half)
            return torch.cat([gate, up], dim=0)
        t = fetch(hnames[0])
        _check(hnames[0], t, shape)
        return t
    if suffix == "mlp.linear_fc1.weight":
        gate, up = fetch(hnames[0]), fetch(hnames[1])
        _check(hnames[0], gate, (spec.ffn_hidden_size, h))
        _check(hnames[1], up, (spec.ffn_hidden_size, h))
        return torch.cat([gate, up], dim=0)
    t = fetch(hnames[0])
    _check(hnames[0], t, full_shape(spec, name, padded_vocab))
    return t


def mcore_to_hf(spec: ModelSpec, name: str, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Split a full Megatron tensor into ``(hf_name, tensor)`` pairs (vocab padding rows dropped)."""
    name = canonical_name(name)
    hnames = hf_names_for(spec, name)
    d, g, hpg = spec.head_dim, spec.num_query_groups, spec.heads_per_group
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return [(hnames[0], full[: spec.vocab_size])]
    suffix = _LAYER_RE.match(name).group(2) if name.startswith("decoder.layers.") else None
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        tail = tuple(full.shape[1:])
        grouped = full.reshape((g, (hpg + 2) * d) + tail)
        q = grouped[:, : hpg * d].reshape((g * hpg * d,) + tail)
        k = grouped[:, hpg * d: (hpg + 1) * d].reshape((g * d,) + tail)
        v = grouped[:, (hpg + 1) * d:].reshape((g * d,) + tail)
        return list(zip(hnames, (q, k, v)))
    if suffix == "mlp.linear_fc1.weight" or len(hnames) == 2:
        gate, up = full.chunk(2, dim=0)
        return [(hnames[0], gate), (hnames[1], up)]
    return [(hnames[0], full)]


def _fused_gate_up(name: str) -> bool:
    return name.endswith("linear_fc1.weight")


def tp_shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The TP rank's shard of a full tensor (``linear_fc1`` splits gate and up separately).

    Routed experts are split over *expert* tensor parallelism: pass the expert-TP rank and size for them.
    """
    name = canonical_name(name)
    dim = partition_dim(name)
    if dim is None or tp_size == 1:
        return full
    if _fused_gate_up(name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    if full.shape[dim] % tp_size:
        raise MappingError(f"{name}: dim {dim} of shape {tuple(full.shape)} is not divisible by TP={tp_size}")
    return full.chunk(tp_size, dim=dim)[tp_rank]


def tp_unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`tp_shard` given every rank's shard in TP-rank order."""
    name = canonical_name(name)
    dim = partition_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if _fused_gate_up(name):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([torch.cat([x[0] for x in halves]), torch.cat([x[1] for x in halves])], dim=0)
    return torch.cat(shards, dim=dim)


def iter_hf_to_mcore(spec: ModelSpec, get_hf: Callable[[str], torch.Tensor],
                     padded_vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    """All ``(canonical_name, full_tensor)`` pairs of a model, from HF tensors."""
    for n in mcore_names(spec):
        yield n, hf_to_mcore(spec, n, get_hf, padded_vocab)
