"""Analytic parameter counts and the memory planner (megatron_dapo.launch.planner)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO_ROOT, shared_path
from megatron_dapo.launch.planner import (
    GiB,
    Arch,
    Layout,
    PlanError,
    PlanRequest,
    activation_bytes_per_layer,
    config_overrides,
    count_parameters,
    estimate_memory,
    format_plan,
    kv_cache_bytes_per_token,
    korthikanti_activation_bytes_per_layer,
    main,
    padded_vocab_size,
    plan,
    stage_layers,
)

QWEN25_32B = {  # the public Qwen2.5-32B config.json fields the planner reads
    "model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
    "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False,
}
QWEN25_7B = {
    "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
}
QWEN25_05B = {
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
}
QWEN25_32B_PARAMS = 32_763_876_352


def _check_sum(c, total):
    assert sum(r.params - r.padding_params - r.duplicate_params for r in c.ranks) == total


def test_qwen25_32b_parameter_count_inline():
    c = count_parameters(QWEN25_32B, tp=8, pp=2)
    assert c.total == QWEN25_32B_PARAMS
    assert len(c.ranks) == 16
    _check_sum(c, QWEN25_32B_PARAMS)
    # 152064 rounds up to a multiple of 128*8 = 1024: 152576, i.e. 512 padding rows, all on TP rank 7,
    # once in the embedding (stage 0) and once in the output layer (stage 1).
    assert (c.padded_vocab_size, c.padding_rows) == (152_576, 512)
    assert c.padding_params == 2 * 512 * 5120
    assert {r.tp_rank for r in c.ranks if r.padding_params} == {7}
    # 32 layers per stage; the stage-0 TP rank holds 1/8 of the embedding.
    assert all(len(r.layers) == 32 for r in c.ranks)
    assert c.ranks[0].breakdown["embedding"] == 152_576 // 8 * 5120


def test_qwen25_32b_parameter_count_shared_config():
    cfg = shared_path("data", "model-configs", "Qwen2.5-32B", "config.json")
    c = count_parameters(cfg.parent, tp=8, pp=2)
    assert c.total == QWEN25_32B_PARAMS
    _check_sum(c, QWEN25_32B_PARAMS)


def test_qwen25_05b_tied_shared_config():
    cfg = shared_path("data", "model-configs", "Qwen2.5-0.5B", "config.json")
    arch = Arch.from_hf_config(cfg)
    assert arch.tied_embeddings and arch.num_parameters() == 494_032_768  # Qwen2.5-0.5B: 0.49B parameters
    # Tied + PP>1: the last stage holds a copy of the embedding, reported as duplicate.
    c = count_parameters(cfg, tp=2, pp=2, vpp=2)
    _check_sum(c, 494_032_768)
    last = [r for r in c.ranks if r.pp_rank == 1]
    assert all("output_layer" in r.breakdown for r in last)
    # Tied + PP=1: no separate output weight.
    c1 = count_parameters(QWEN25_05B, tp=1, pp=1)
    assert "output_layer" not in c1.ranks[0].breakdown and c1.ranks[0].params == 494_032_768


def test_vpp_layer_assignment_and_errors():
    assert stage_layers(8, 2, 2) == [(0, 1, 4, 5), (2, 3, 6, 7)]
    assert stage_layers(4, 2) == [(0, 1), (2, 3)]
    with pytest.raises(PlanError, match="PP=3 does not divide num_layers=64"):
        count_parameters(QWEN25_32B, tp=8, pp=3)
    with pytest.raises(PlanError, match="num_attention_heads=40"):
        count_parameters(QWEN25_32B, tp=3, pp=1)
    with pytest.raises(PlanError, match="num_query_groups"):
        count_parameters(QWEN25_32B, tp=5, pp=1)
    with pytest.raises(PlanError, match="hf_config.hidden_size"):
        Arch.from_hf_config({"num_attention_heads": 4})
    assert padded_vocab_size(151936, 1) == 151936 and padded_vocab_size(151936, 8) == 152576


@pytest.mark.slow
def test_count_matches_megatron_core_model():
    """Build the real megatron-core GPTModel (TP=PP=1, CPU, local spec) and compare parameter counts."""
    code = textwrap.dedent("""
        import os, torch, json
        from megatron_dapo.launch.dist_env import resolve_dist_env
        env = resolve_dist_env({})
        torch.distributed.init_process_group("gloo", init_method=env.init_method, rank=0, world_size=1)
        from megatron.core import parallel_state
        parallel_state.initialize_model_parallel(1, 1)
        from megatron.core.transformer.transformer_config import TransformerConfig
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        out = {}
        for tied in (False, True):
            cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=96, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                add_bias_linear=False, add_qkv_bias=True, normalization="RMSNorm", use_cpu_initialization=True)
            m = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                         vocab_size=1024, max_sequence_length=128, share_embeddings_and_output_weights=tied,
                         position_embedding_type="rope")
            out[str(tied)] = sum(p.numel() for p in m.parameters())
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for tied in (False, True):
        hf = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": tied}
        c = count_parameters(hf, tp=1, pp=1)
        assert c.ranks[0].params == got[str(tied)] == c.total


GPT = Arch(name="gpt", hidden_size=1024, num_layers=4, num_attention_heads=16, num_query_groups=16, head_dim=64,
           ffn_hidden_size=4096, vocab_size=50257, tied_embeddings=True, gated_mlp=False, dropout=True)


@pytest.mark.parametrize("t,sp,recompute", [(1, False, None), (4, False, None), (4, True, None),
                                            (8, True, "selective"), (2, False, "selective"),
                                            (1, False, "full"), (8, True, "full")])
def test_activation_formula_reduces_to_korthikanti(t, sp, recompute):
    s, b = 2048, 2
    ours = activation_bytes_per_layer(GPT, s, b, t, sp, recompute, flash_attention=False)
    paper = korthikanti_activation_bytes_per_layer(s, b, GPT.hidden_size, GPT.num_attention_heads, t, sp, recompute)
    assert ours == pytest.approx(paper, rel=1e-12)
    # The paper's headline: sbh(34 + 5as/h) with no parallelism.
    if t == 1 and recompute is None:
        assert ours == s * b * 1024 * (34 + 5 * 16 * s / 1024)


def test_flash_attention_drops_quadratic_term():
    arch = Arch.from_hf_config(QWEN25_32B)
    small = activation_bytes_per_layer(arch, 4096, 1, 8, True, None, flash_attention=True)
    big = activation_bytes_per_layer(arch, 4096, 1, 8, True, None, flash_attention=False)
    assert big - small > 2 * 40 * 4096 * 4096 / 8 * 0.99
    # Linear in tokens with flash attention.
    assert activation_bytes_per_layer(arch, 8192, 1, 8, True) == pytest.approx(2 * small)


def test_kv_cache_bytes_per_token():
    arch = Arch.from_hf_config(QWEN25_32B)
    assert kv_cache_bytes_per_token(arch, 1) == 2 * 64 * 8 * 128 * 2
    assert kv_cache_bytes_per_token(arch, 8) == 2 * 64 * 1 * 128 * 2
    assert kv_cache_bytes_per_token(arch, 16) == kv_cache_bytes_per_token(arch, 8)  # KV heads replicated


@pytest.mark.parametrize("dist_opt,dp,expected", [(False, 16, 18.0), (True, 16, 6 + 12 / 16), (True, 2, 12.0)])
def test_megatron_bytes_per_parameter(dist_opt, dp, expected):
    arch = Arch.from_hf_config(QWEN25_32B)
    req = PlanRequest(hf_config=arch, nodes=dp, gpus_per_node=8, distributed_optimizer=dist_opt, colocated=False)
    lay = Layout(tp=8, pp=1, vpp=None, cp=1, dp=dp, token_budget=22528, recompute="full",
                 optimizer_offload=False, sequence_parallel=True)
    m = estimate_memory(arch, lay, req)
    assert (m.weights + m.grads + m.optimizer) / m.params_per_gpu == pytest.approx(expected)
    off = estimate_memory(arch, Layout(**{**lay.__dict__, "optimizer_offload": True}), req)
    assert (off.weights + off.grads + off.optimizer) / off.params_per_gpu == pytest.approx(6.0)
    assert off.optimizer_host == pytest.approx(m.optimizer)


def test_pipeline_in_flight_matches_megatron_factor():
    """First-stage activations: L layers with 1F1B, times 1 + (PP-1)/(PP*VPP) when interleaved."""
    arch = Arch.from_hf_config(QWEN25_32B)
    req = PlanRequest(hf_config=arch, nodes=16, colocated=False, num_microbatches=64)
    base = dict(tp=8, cp=1, dp=4, token_budget=22528, recompute="none", optimizer_offload=False, sequence_parallel=True)
    per_layer = activation_bytes_per_layer(arch, 22528, 1, 8, True)
    m = estimate_memory(arch, Layout(pp=4, vpp=None, **base), req)
    assert m.peak_stage == 0
    assert m.activations == pytest.approx(64 * per_layer + 8 * 22528 * 4)
    mi = estimate_memory(arch, Layout(pp=4, vpp=2, **base), req)
    assert mi.activations == pytest.approx(64 * per_layer * (1 + 3 / 8) + 8 * 22528 * 4)


def test_plan_qwen25_32b_16_nodes_colocated():
    res = plan(PlanRequest(hf_config=QWEN25_32B, nodes=16, colocated=True, sglang_mem_fraction=0.6))
    assert res.feasible and res.engine_tp == 4
    best = res.best
    assert best.layout.tp * best.layout.pp * best.layout.cp * best.layout.dp == 128
    assert best.memory.train_total <= 80 * GiB
    assert best.memory.kv_tokens_per_engine >= 22528
    for c in res.feasible:
        assert c.memory.train_total <= 80 * GiB and 40 % c.layout.tp == 0 and 64 % c.layout.pp == 0
    reasons = " | ".join(r for c in res.rejected for r in c.reasons)
    assert "does not divide num_attention_heads=40" not in reasons  # TP in (1,2,4,8) all divide 40
    assert "training needs" in reasons and "does not divide 128 GPUs" in reasons
    text = format_plan(res, top=5, show_rejected=True)
    assert "best layout as config overrides" in text and "actor.tensor_model_parallel_size=" in text


def test_plan_rejects_with_reasons_and_errors():
    res = plan(PlanRequest(hf_config=QWEN25_7B, nodes=1, gpus_per_node=8, max_response_length=8192,
                           max_prompt_length=1024, ppo_mini_batch_size=256))
    reasons = {r for c in res.rejected for r in c.reasons}
    assert "TP=8 does not divide num_attention_heads=28" in reasons
    assert any(r.startswith("PP=8 does not divide num_layers=28") for r in reasons)
    assert all(c.layout.tp <= 4 for c in res.feasible)
    # The 32B model cannot be trained on one 80 GiB GPU even with offload and full recompute.
    none = plan(PlanRequest(hf_config=QWEN25_32B, nodes=1, gpus_per_node=1, max_response_length=1024))
    assert none.best is None and "no feasible layout" in format_plan(none)
    with pytest.raises(PlanError, match="sglang-mem-fraction"):
        plan(PlanRequest(hf_config=QWEN25_7B, sglang_mem_fraction=1.5))
    with pytest.raises(PlanError, match="--sglang-tp=3"):
        plan(PlanRequest(hf_config=QWEN25_7B, sglang_tp=3))


def test_overrides_load_into_config():
    from megatron_dapo.config import load_config

    res = plan(PlanRequest(hf_config=QWEN25_05B, nodes=1, gpus_per_node=1, max_response_length=8192,
                           max_prompt_length=1024, ppo_mini_batch_size=64))
    cfg = load_config(None, ["model.hf_path=/x"] + config_overrides(res.best, res.request), validate=False)
    assert cfg.actor.tensor_model_parallel_size == res.best.layout.tp
    assert cfg.actor.max_tokens_per_gpu == res.best.layout.token_budget


def test_cli(tmp_path, capsys):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(QWEN25_05B))
    rc = main(["--hf-config", str(tmp_path), "--nodes", "1", "--gpus-per-node", "1", "--colocated",
               "--max-response-length", "4096", "--max-prompt-length", "512", "--ppo-mini-batch-size", "32"])
    out = capsys.readouterr().out
    assert rc == 0 and "feasible layouts" in out and "KV cache:" in out
    rc = main(["--hf-config", str(p), "--gpus-per-node", "1", "--json", "--ppo-mini-batch-size", "32",
               "--max-response-length", "4096", "--max-prompt-length", "512"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and "actor.tensor_model_parallel_size=1" in data["overrides"]
    r = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "plan_parallelism.py"), "--hf-config",
                        str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not found" in r.stderr


# ----------------------------------------------------------------- the shipped examples agree with the planner

EXAMPLES = {
    "qwen2.5-32b": (QWEN25_32B, 16),
    "qwen2.5-7b": (QWEN25_7B, 1),
    "qwen2.5-0.5b": (QWEN25_05B, 1),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_layout_is_the_planners_choice(name):
    import yaml
    from megatron_dapo.config import load_config

    hf, nodes = EXAMPLES[name]
    path = REPO_ROOT / "examples" / name / "dapo.yaml"
    cfg = load_config(path, validate=False)
    gpus_per_node = 1 if name == "qwen2.5-0.5b" else 8
    meta = yaml.safe_load(path.read_text())
    assert "actor" in meta
    req = PlanRequest(hf_config=hf, nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory_gb=80,
                      max_prompt_length=cfg.data.max_prompt_length,
                      max_response_length=cfg.rollout.max_response_length, colocated=cfg.rollout.colocated,
                      sglang_mem_fraction=cfg.rollout.mem_fraction_static, sglang_tp=cfg.rollout.engine_tp_size,
                      ppo_mini_batch_size=cfg.actor.ppo_mini_batch_size,
                      logprob_chunk_size=cfg.actor.logprob_chunk_size)
    res = plan(req)
    assert res.best is not None
    want = dict(o.split("=", 1) for o in config_overrides(res.best, req))
    a = cfg.actor
    got = {
        "actor.tensor_model_parallel_size": str(a.tensor_model_parallel_size),
        "actor.pipeline_model_parallel_size": str(a.pipeline_model_parallel_size),
        "actor.virtual_pipeline_model_parallel_size": str(a.virtual_pipeline_model_parallel_size or "null"),
        "actor.context_parallel_size": str(a.context_parallel_size),
        "actor.sequence_parallel": str(a.sequence_parallel).lower(),
        "actor.use_distributed_optimizer": str(a.use_distributed_optimizer).lower(),
        "actor.recompute": a.recompute or "null",
        "actor.max_tokens_per_gpu": str(a.max_tokens_per_gpu),
        "actor.params_dtype": a.params_dtype,
        "actor.offload": str(a.offload).lower(),
        "rollout.engine_tp_size": str(cfg.rollout.engine_tp_size),
        "rollout.mem_fraction_static": str(cfg.rollout.mem_fraction_static),
        "rollout.colocated": str(cfg.rollout.colocated).lower(),
    }
    assert got == want, format_plan(res, top=5)
    # the sbatch node count in submit.sh matches the plan
    submit = (REPO_ROOT / "examples" / name / "submit.sh").read_text()
    assert f"NODES={nodes}" in submit or f"NODES:-{nodes}" in submit
