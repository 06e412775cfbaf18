"""The planner and memory model with MoE experts (megatron_dapo.launch: param_count, memory, planner) and
the MoE dry run's per-rank counts (megatron_dapo.dry_run)."""
from __future__ import annotations

import pytest

from conftest import REPO_ROOT, shared_path
from megatron_dapo.launch.planner import (
    GiB,
    Arch,
    Layout,
    PlanError,
    PlanRequest,
    config_overrides,
    count_parameters,
    estimate_memory,
    format_plan,
    main,
    moe_mlp_activation_bytes,
    plan,
)

# Qwen3-30B-A3B's public config.json numbers (the shared copy is read where the test needs the file)
H, L, E, K, FE, V, HEADS, KV, D = 2048, 48, 128, 8, 768, 151936, 32, 4, 128


def _qwen3_30b() -> Arch:
    return Arch.from_hf_config(shared_path("data", "model-configs", "Qwen3-30B-A3B"))


def _hand_counts(tp: int, ep: int, etp: int) -> tuple[int, int, int, int]:
    """(total, active, expert params per GPU, all params per GPU at PP=1, TP rank 0), counted by hand."""
    attn = H * (HEADS * D + 2 * KV * D) + HEADS * D * H  # q, k, v and output projections
    norms = 2 * H + 2 * D  # input / pre-MLP RMSNorm, q / k norm
    router = E * H
    expert = 3 * H * FE  # SwiGLU: gate, up, down
    total = L * (attn + norms + router + E * expert) + 2 * V * H + H
    active = total - L * (E - K) * expert
    vpad = -(-V // (128 * tp)) * 128 * tp
    per_gpu_experts = L * (E // ep) * expert // etp
    per_gpu = per_gpu_experts + L * (attn // tp + norms + router) + 2 * (vpad // tp) * H + H
    return total, active, per_gpu_experts, per_gpu


@pytest.mark.parametrize("tp,ep,etp", [(4, 8, 1), (2, 4, 2), (1, 1, 1), (4, 2, 4)])
def test_expert_params_per_rank_match_a_hand_count(tp, ep, etp):
    arch = _qwen3_30b()
    assert arch.is_moe and (arch.num_experts, arch.moe_topk, arch.moe_ffn_hidden_size) == (E, K, FE)
    total, active, experts, per_gpu = _hand_counts(tp, ep, etp)
    assert total == 30_532_122_624  # "30.5B"
    assert active == 3_353_032_704  # "3.3B active"
    c = count_parameters(arch, tp=tp, pp=1, ep=ep, etp=etp)
    assert (c.total, c.active, c.ep, c.etp) == (total, active, ep, etp)
    assert len(c.ranks) == tp
    assert all(r.expert_params == experts for r in c.ranks)
    assert c.ranks[0].params == per_gpu
    # the router is replicated over TP: a duplicate on TP ranks > 0, with the norms (and the final norm)
    if tp > 1:
        assert c.ranks[1].duplicate_params == L * (2 * H + 2 * D + E * H) + H


def test_example_layout_memory_terms_by_hand():
    """TP=4 EP=8 ETP=1 on 64 GPUs: dense Adam state over DP=16, expert Adam state over expert DP=8."""
    arch = _qwen3_30b()
    req = PlanRequest(hf_config=arch, nodes=8, sglang_tp=4, colocated=True)
    lay = Layout(tp=4, pp=1, vpp=None, cp=1, dp=16, token_budget=22528, recompute="none", optimizer_offload=False,
                 sequence_parallel=True, ep=8, etp=1)
    assert lay.expert_dp == 8
    m = estimate_memory(arch, lay, req, engine_tp=4)
    _, _, experts, per_gpu = _hand_counts(4, 8, 1)
    assert (m.params_per_gpu, m.expert_params_per_gpu) == (per_gpu, experts)
    assert m.weights == 2 * per_gpu and m.grads == 4 * per_gpu
    assert m.optimizer == pytest.approx(12 * (per_gpu - experts) / 16 + 12 * experts / 8)
    # alltoall send buffer: tokens on this GPU (22528 / TP 4 under SP) x top-8 copies x hidden, bf16
    assert m.dispatcher_buffer == 2 * (22528 / 4) * K * H
    # each engine replica holds every expert, split over its 4 GPUs
    assert m.engine_weights == 2 * 30_532_122_624 / 4
    assert m.kv_bytes_per_token == 2 * L * 1 * D * 2  # 4 KV heads / engine TP 4 = 1 per GPU
    assert m.train_total / GiB < 80


def test_dispatcher_buffers_alltoall_vs_allgather():
    arch = _qwen3_30b()
    t = 1000.0
    kept_a2a, buf_a2a = moe_mlp_activation_bytes(arch, t, ep=8, etp=1, dispatcher="alltoall")
    kept_ag, buf_ag = moe_mlp_activation_bytes(arch, t, ep=8, etp=1, dispatcher="allgather")
    assert kept_a2a == kept_ag == 6 * t * E + 2 * t * K * H + 6 * t * K * FE + 2 * t * K * H
    assert buf_a2a == 2 * t * K * H
    assert buf_ag == t * 8 * (2 * H + 5 * E)  # every token of the 8-GPU EP group, with its routing scores
    assert moe_mlp_activation_bytes(arch, t, ep=16, dispatcher="allgather")[1] == 2 * buf_ag
    with pytest.raises(PlanError, match="moe_token_dispatcher_type='flex'"):
        moe_mlp_activation_bytes(arch, t, dispatcher="flex")


def test_ep_not_dividing_the_experts_is_refused_in_one_line():
    arch = _qwen3_30b()
    with pytest.raises(PlanError) as e:
        count_parameters(arch, tp=4, pp=1, ep=3, etp=1)
    assert str(e.value) == "expert_model_parallel_size (EP)=3 does not divide num_experts=128"
    with pytest.raises(PlanError, match=r"expert_tensor_parallel_size \(ETP\)=5 does not divide moe_intermediate"):
        count_parameters(arch, tp=4, pp=1, ep=8, etp=5)
    with pytest.raises(PlanError, match=r"\(EP\)=3 does not divide num_experts=128"):
        plan(PlanRequest(hf_config=arch, nodes=8, ep_sizes=[3]))
    with pytest.raises(PlanError, match="not a MoE model"):
        count_parameters({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "vocab_size": 100}, tp=1, pp=1, ep=2)


def test_dry_run_refuses_ep_not_dividing_the_experts(capsys):
    from megatron_dapo.config import load_config
    from megatron_dapo.dry_run import dry_run

    path = REPO_ROOT / "examples" / "qwen3-30b-a3b" / "dapo.yaml"
    cfg = load_config(path, ["actor.expert_model_parallel_size=3"], validate=False)
    rc = dry_run(cfg, str(path), [], hf_config=str(shared_path("data", "model-configs", "Qwen3-30B-A3B")), nodes=8)
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 2
    assert out == ["megatron-dapo: dry run: config error: actor.expert_model_parallel_size (EP)=3 does not divide "
                   "num_experts=128"]


TINY_MOE = {  # a small Qwen3-MoE with a dense layer (mlp_only_layers) to check the meta build rank by rank
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [1], "tie_word_embeddings": False, "hidden_act": "silu",
    "max_position_embeddings": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
}


@pytest.mark.parametrize("tp,pp,ep,etp", [(2, 2, 4, 1), (2, 1, 2, 2)])
def test_meta_build_counts_equal_the_planner(tp, pp, ep, etp):
    from megatron_dapo.dry_run import count_shards_on_meta

    shards = count_shards_on_meta(TINY_MOE, tp, pp, None, 8, ep=ep, etp=etp)
    c = count_parameters(TINY_MOE, tp, pp, None, 8, ep=ep, etp=etp)
    got = {(s.pp_rank, s.tp_rank): (s.params, s.experts, s.padding, s.duplicate) for s in shards}
    want = {(r.pp_rank, r.tp_rank): (r.params, r.expert_params, r.padding_params, r.duplicate_params) for r in c.ranks}
    assert got == want
    # stage 0 holds MoE layer 0 and dense layer 1: fewer experts than stage 1 (two MoE layers) when PP=2
    if pp == 2:
        assert 2 * got[(0, 0)][1] == got[(1, 0)][1] == 2 * (8 // ep) * 3 * 64 * 32 // etp


def test_planner_ranks_ep_and_matches_the_example():
    """The example's parallelism is the planner's first layout for its header's command; EP=8 ETP=1 in a node."""
    from megatron_dapo.config import load_config

    path = REPO_ROOT / "examples" / "qwen3-30b-a3b" / "dapo.yaml"
    cfg = load_config(path, validate=False)
    req = PlanRequest(hf_config=_qwen3_30b(), nodes=8, gpus_per_node=8, gpu_memory_gb=80,
                      max_prompt_length=cfg.data.max_prompt_length, max_response_length=cfg.rollout.max_response_length,
                      colocated=cfg.rollout.colocated, sglang_mem_fraction=cfg.rollout.mem_fraction_static,
                      sglang_tp=cfg.rollout.engine_tp_size, ppo_mini_batch_size=cfg.actor.ppo_mini_batch_size,
                      logprob_chunk_size=cfg.actor.logprob_chunk_size)
    res = plan(req)
    best = res.best
    assert best is not None and (best.layout.ep, best.layout.expert_tp) == (8, 1)
    eps = {c.layout.ep for c in res.feasible}
    assert {2, 4, 8} <= eps and max(eps) == 8  # EP x ETP stays inside the 8-GPU node by default
    want = dict(o.split("=", 1) for o in config_overrides(best, req))
    a = cfg.actor
    got = {
        "actor.tensor_model_parallel_size": str(a.tensor_model_parallel_size),
        "actor.virtual_pipeline_model_parallel_size": str(a.virtual_pipeline_model_parallel_size or "null"),
        "actor.sequence_parallel": str(a.sequence_parallel).lower(),
        "actor.use_distributed_optimizer": str(a.use_distributed_optimizer).lower(),
        "actor.params_dtype": a.params_dtype,
        "rollout.mem_fraction_static": str(cfg.rollout.mem_fraction_static),
        "rollout.colocated": str(cfg.rollout.colocated).lower(),
        "actor.pipeline_model_parallel_size": str(a.pipeline_model_parallel_size),
        "actor.context_parallel_size": str(a.context_parallel_size),
        "actor.recompute": a.recompute or "null",
        "actor.max_tokens_per_gpu": str(a.max_tokens_per_gpu),
        "actor.offload": str(a.offload).lower(),
        "actor.expert_model_parallel_size": str(a.expert_model_parallel_size),
        "actor.expert_tensor_parallel_size": str(a.expert_tensor_parallel_size),
        "actor.moe_token_dispatcher_type": a.moe_token_dispatcher_type,
        "rollout.engine_tp_size": str(cfg.rollout.engine_tp_size),
    }
    assert got == want, format_plan(res, top=5)
    assert cfg.rollout.num_engines * cfg.rollout.engine_tp_size == 64
    assert "NODES=${NODES:-8}" in (path.parent / "submit.sh").read_text()


def test_cli_accepts_ep_and_etp(capsys):
    cfg = str(shared_path("data", "model-configs", "Qwen3-30B-A3B"))
    rc = main(["--hf-config", cfg, "--nodes", "8", "--colocated", "--sglang-tp", "4", "--ep", "4,8", "--etp", "1,tp",
               "--max-pp", "1", "--top", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "MoE: 128 experts top-8" in out and "EP ETP EDP" in out
    assert "actor.expert_model_parallel_size=8 actor.expert_tensor_parallel_size=1" in out
    with pytest.raises(SystemExit):
        main(["--hf-config", cfg, "--ep", "6"])
    assert "expert_model_parallel_size (EP)=6 does not divide num_experts=128" in capsys.readouterr().err
