"""Qwen3-MoE config and name mapping, single process, no Megatron model (issue 21):

* a tiny Qwen3-MoE ``config.json`` and the published Qwen3-30B-A3B one parse into a :class:`ModelSpec`
  (expert fields, dense/MoE layer pattern, exact parameter count) and into megatron-core
  ``TransformerConfig`` arguments; configs the mapping cannot express fail with one error naming the field;
* every HF tensor name of a real (tiny) checkpoint is produced by the mapping, and HF → Megatron → HF is
  bit-exact at EP=1 and through per-rank EP=2 shards (local expert indices) and expert-TP=2 shards;
* the shared-expert table entry (``qwen2_moe``) maps its names and shapes both ways.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_scripts.moe_common import make_tiny_qwen3_moe  # noqa: E402

from megatron_dapo.models import mapping  # noqa: E402
from megatron_dapo.models.hf_config import (UnsupportedModelError, spec_from_hf_config,  # noqa: E402
                                            transformer_config_kwargs)



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny_moe") / "m")


@pytest.fixture(scope="module")
def hf_tensors(tiny):
    from safetensors.torch import load_file

    return load_file(str(tiny / "model.safetensors"))


def test_tiny_spec(tiny, hf_tensors):
    spec = spec_from_hf_config(tiny)
    assert spec.family == "qwen3_moe" and spec.qk_layernorm and not spec.qkv_bias
    assert (spec.num_experts, spec.moe_topk, spec.moe_ffn_hidden_size, spec.ffn_hidden_size) == (4, 2, 32, 96)
    assert spec.moe_layers == (True, False, True) and spec.moe_norm_topk_prob
    assert spec.num_parameters() == sum(t.numel() for t in hf_tensors.values())


def test_qwen3_30b_a3b_config_parses(shared):
    cfg = json.loads(shared("data", "model-configs", "Qwen3-30B-A3B", "config.json").read_text())
    spec = spec_from_hf_config(cfg)
    assert (spec.num_layers, spec.num_experts, spec.moe_topk, spec.moe_ffn_hidden_size) == (48, 128, 8, 768)
    assert all(spec.moe_layers) and spec.head_dim == 128 and spec.num_query_groups == 4
    assert 30.4e9 < spec.num_parameters() < 30.6e9  # "30B-A3B": 30.5B parameters
    kw = transformer_config_kwargs(spec, tp=4, ep=8, on_cpu=False, params_dtype="bf16")
    assert kw["num_moe_experts"] == 128 and kw["moe_router_topk"] == 8 and kw["moe_ffn_hidden_size"] == 768
    assert kw["moe_router_pre_softmax"] is False  # norm_topk_prob: softmax over the selected k logits
    assert kw["moe_token_dispatcher_type"] == "alltoall" and kw["expert_model_parallel_size"] == 8
    assert kw["moe_aux_loss_coeff"] == 0.0 and kw["moe_router_load_balancing_type"] == "none"
    assert kw["moe_layer_freq"] == [1] * 48 and kw["moe_grouped_gemm"] is False
    assert len(mapping.mcore_names(spec)) == 3 + 48 * (6 + 1 + 128 * 2)


def test_transformer_config_builds(tiny):
    from megatron_dapo.cpu_shims import apply_cpu_shims

    apply_cpu_shims()
    from megatron.core.transformer import TransformerConfig  # heavy, after the shims

    spec = spec_from_hf_config(tiny)
    kw = transformer_config_kwargs(spec)
    assert kw["moe_token_dispatcher_type"] == "allgather" and kw["variable_seq_lengths"] is False
    assert kw["moe_layer_freq"] == [1, 0, 1]
    cfg = TransformerConfig(**kw)
    assert cfg.num_moe_experts == 4 and cfg.qk_layernorm
    no_norm = dataclasses.replace(spec, moe_norm_topk_prob=False)
    assert transformer_config_kwargs(no_norm)["moe_router_pre_softmax"] is True
    assert transformer_config_kwargs(spec, moe_aux_loss_coeff=0.01)["moe_router_load_balancing_type"] == "aux_loss"


@pytest.mark.parametrize("change, field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"num_experts_per_tok": 1}, "norm_topk_prob"),
    ({"mlp_only_layers": [7]}, "mlp_only_layers"),
    ({"mlp_only_layers": [0, 1, 2]}, "mlp_only_layers"),
    ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ({"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_fields_named(tiny, change, field):
    cfg = {**json.loads((tiny / "config.json").read_text()), **change}
    with pytest.raises(UnsupportedModelError, match=field):
        spec_from_hf_config(cfg)


def test_dense_family_with_experts_rejected():
    cfg = {"architectures": ["Qwen3ForCausalLM"], "num_experts": 8, "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 100}
    with pytest.raises(UnsupportedModelError, match="num_experts"):
        spec_from_hf_config(cfg)


def test_decoder_sparse_step_pattern(tiny):
    cfg = {**json.loads((tiny / "config.json").read_text()), "num_hidden_layers": 4, "decoder_sparse_step": 2,
           "mlp_only_layers": []}
    assert spec_from_hf_config(cfg).moe_layers == (False, True, False, True)


def test_expert_parallel_must_divide_experts(tiny):
    spec = spec_from_hf_config(tiny)
    with pytest.raises(UnsupportedModelError, match="expert_model_parallel_size=3"):
        transformer_config_kwargs(spec, ep=3)
    with pytest.raises(UnsupportedModelError, match="expert_tensor_parallel_size=3"):
        transformer_config_kwargs(spec, etp=3)
    with pytest.raises(UnsupportedModelError, match="moe_token_dispatcher_type"):
        transformer_config_kwargs(spec, moe_token_dispatcher_type="flex")


def test_names_cover_the_checkpoint(tiny, hf_tensors):
    spec = spec_from_hf_config(tiny)
    assert sorted(mapping.hf_names(spec)) == sorted(hf_tensors)
    assert mapping.hf_names_for(spec, "decoder.layers.2.mlp.router.weight") == ["model.layers.2.mlp.gate.weight"]
    assert mapping.hf_names_for(spec, "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight") == [
        "model.layers.0.mlp.experts.3.gate_proj.weight", "model.layers.0.mlp.experts.3.up_proj.weight"]
    assert mapping.hf_names_for(spec, "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight") == [
        "model.layers.0.mlp.experts.1.down_proj.weight"]
    assert "decoder.layers.1.mlp.linear_fc1.weight" in mapping.mcore_names(spec)  # the dense layer
    assert mapping.partition_dim("decoder.layers.0.mlp.router.weight") is None
    assert mapping.partition_dim("decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight") == 1


def _round_trip(spec, hf, shard):
    """HF -> full Megatron tensors -> ``shard(name, full)`` -> back to HF tensors."""
    back = {}
    for name in mapping.mcore_names(spec):
        full = shard(name, mapping.hf_to_mcore(spec, name, hf.__getitem__, spec.padded_vocab_size(1)))
        back.update(mapping.mcore_to_hf(spec, name, full))
    return back


def _assert_bit_exact(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k


def test_round_trip_ep1_bit_exact(tiny, hf_tensors):
    spec = spec_from_hf_config(tiny)
    _assert_bit_exact(hf_tensors, _round_trip(spec, hf_tensors, lambda n, t: t))


def test_round_trip_through_ep2_rank_shards(tiny, hf_tensors):
    """Each EP rank keeps only its experts, renamed to local indices; reassembled by global index."""
    spec = spec_from_hf_config(tiny)
    ep, n_local = 2, spec.num_experts // 2
    padded = spec.padded_vocab_size(1)
    per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(ep)]
    for name in mapping.mcore_names(spec):
        full = mapping.hf_to_mcore(spec, name, hf_tensors.__getitem__, padded)
        owner = mapping.expert_parallel_rank(spec, name, ep)
        for r in range(ep):
            if owner is None or owner == r:
                e = mapping.expert_index(name)
                local = name if e is None else name.replace(f"local_experts.{e}.", f"local_experts.{e - r * n_local}.")
                per_rank[r][local] = full
    assert sum("local_experts" in n for n in per_rank[1]) == 2 * 2 * n_local  # 2 MoE layers x fc1/fc2 x experts
    assert not any("local_experts.2." in n or "local_experts.3." in n for r in per_rank for n in r)
    back = {}
    for r, shard in enumerate(per_rank):
        for local, t in shard.items():
            e = mapping.expert_index(local)
            name = local if e is None else local.replace(f"local_experts.{e}.", f"local_experts.{e + r * n_local}.")
            back.update(mapping.mcore_to_hf(spec, name, t))
    _assert_bit_exact(hf_tensors, back)


def test_expert_tensor_parallel_shards(tiny, hf_tensors):
    spec = spec_from_hf_config(tiny)
    name = "decoder.layers.2.mlp.experts.local_experts.1.linear_fc1.weight"
    full = mapping.hf_to_mcore(spec, name, hf_tensors.__getitem__, 256)
    shards = [mapping.tp_shard(name, full, r, 2) for r in range(2)]
    gate = hf_tensors["model.layers.2.mlp.experts.1.gate_proj.weight"]
    assert torch.equal(shards[1][:16], gate[16:])  # rank r holds [gate_r; up_r]
    assert torch.equal(mapping.tp_unshard(name, shards), full)


def test_shared_expert_table_entry(tiny, hf_tensors):
    spec = dataclasses.replace(spec_from_hf_config(tiny), moe_layout="qwen2_moe", shared_expert_ffn_hidden_size=48,
                               shared_expert_gate=True)
    p = "decoder.layers.0.mlp."
    assert mapping.hf_names_for(spec, p + "shared_experts.linear_fc1.weight") == [
        "model.layers.0.mlp.shared_expert.gate_proj.weight", "model.layers.0.mlp.shared_expert.up_proj.weight"]
    assert mapping.hf_names_for(spec, p + "shared_experts.linear_fc2.weight") == [
        "model.layers.0.mlp.shared_expert.down_proj.weight"]
    assert mapping.hf_names_for(spec, p + "shared_experts.gate_weight") == [
        "model.layers.0.mlp.shared_expert_gate.weight"]
    assert mapping.full_shape(spec, p + "shared_experts.linear_fc1.weight", 256) == (96, 64)
    assert mapping.partition_dim(p + "shared_experts.linear_fc2.weight") == 1
    assert mapping.expert_index(p + "shared_experts.linear_fc1.weight") is None
    names = mapping.mcore_names(spec)
    assert p + "shared_experts.gate_weight" in names and "decoder.layers.1.mlp.shared_experts.gate_weight" not in names
    g = torch.Generator().manual_seed(0)
    extra = {h: torch.randn(s, generator=g) for h, s in [
        ("model.layers.{i}.mlp.shared_expert.gate_proj.weight", (48, 64)),
        ("model.layers.{i}.mlp.shared_expert.up_proj.weight", (48, 64)),
        ("model.layers.{i}.mlp.shared_expert.down_proj.weight", (64, 48)),
        ("model.layers.{i}.mlp.shared_expert_gate.weight", (1, 64))]}
    hf = dict(hf_tensors)
    for i in (0, 2):
        hf.update({k.format(i=i): v for k, v in extra.items()})
    _assert_bit_exact(hf, _round_trip(spec, hf, lambda n, t: t))
    assert spec.num_parameters() == sum(t.numel() for t in hf.values())


def test_wrong_expert_shape_names_tensor(tiny, hf_tensors):
    spec = spec_from_hf_config(tiny)
    bad = dict(hf_tensors)
    bad["model.layers.0.mlp.experts.2.up_proj.weight"] = torch.zeros(31, 64)
    with pytest.raises(mapping.MappingError, match=r"experts\.2\.up_proj.*\(32, 64\).*\(31, 64\)"):
        mapping.hf_to_mcore(spec, "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight", bad.__getitem__,
                            256)
