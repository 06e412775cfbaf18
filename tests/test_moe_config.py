"""``actor.expert_model_parallel_size`` / ``expert_tensor_parallel_size`` / ``moe_token_dispatcher_type`` /
``moe_aux_loss_coeff`` (issue 21): validated before anything is allocated, one error naming the key."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import CONFIG  # noqa: E402

from megatron_dapo.config import ActorConfig, ConfigError, load_config  # noqa: E402


@pytest.mark.parametrize("over, world, key", [
    (dict(expert_model_parallel_size=0), None, "actor.expert_model_parallel_size"),
    (dict(expert_tensor_parallel_size=0), None, "actor.expert_tensor_parallel_size"),
    (dict(moe_token_dispatcher_type="flex"), None, "actor.moe_token_dispatcher_type"),
    (dict(moe_token_dispatcher_type="alltoall"), None, "actor.moe_token_dispatcher_type"),  # CPU: no CUDA events
    (dict(moe_aux_loss_coeff=-1.0), None, "actor.moe_aux_loss_coeff"),
    (dict(expert_model_parallel_size=4), 2, "actor.expert_model_parallel_size"),
    (dict(expert_model_parallel_size=2, expert_tensor_parallel_size=2), 2, "actor.expert_model_parallel_size"),
])
def test_actor_expert_keys_rejected(over, world, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        ActorConfig(**over).validate(world_size=world)


def test_actor_expert_keys_accepted():
    ActorConfig(expert_model_parallel_size=2, moe_token_dispatcher_type="allgather").validate(world_size=2)
    ActorConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1
                ).validate(world_size=2)
    ActorConfig(moe_token_dispatcher_type="alltoall").validate(local=False)  # a cluster target decides


def _model(tmp_path, **cfg):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_ep_checked_against_the_model_config(tmp_path):
    moe = _model(tmp_path, architectures=["Qwen3MoeForCausalLM"], num_experts=6, moe_intermediate_size=32)
    load_config(CONFIG, [f"model.hf_path={moe}", "actor.expert_model_parallel_size=2"], world_size=2)
    with pytest.raises(ConfigError, match=r"^actor.expert_model_parallel_size: EP=4 must divide num_experts=6"):
        load_config(CONFIG, [f"model.hf_path={moe}", "actor.expert_model_parallel_size=4"], world_size=4)
    with pytest.raises(ConfigError, match=r"^actor.expert_tensor_parallel_size: ETP=3 must divide"):
        load_config(CONFIG, [f"model.hf_path={moe}", "actor.expert_tensor_parallel_size=3"], world_size=3)


def test_ep_needs_a_moe_model(tmp_path):
    dense = _model(tmp_path, architectures=["Qwen3ForCausalLM"])
    with pytest.raises(ConfigError, match=r"^actor.expert_model_parallel_size: expert parallelism needs a MoE"):
        load_config(CONFIG, [f"model.hf_path={dense}", "actor.expert_model_parallel_size=2"], world_size=2)


def test_moe_model_refused_on_the_engines_measured_to_serve_it_wrongly(tmp_path):
    """benchmarks/RESULTS.md, "MoE on real engines (CPU)": SGLang 0.5 builds every Qwen3-MoE layer as MoE (a model with
    dense layers is scored wrongly) and vLLM 0.32 on CPU reloads MoE weights wrongly; both are refused in one line."""
    dense_layers = _model(tmp_path, architectures=["Qwen3MoeForCausalLM"], num_experts=4, moe_intermediate_size=32,
                          mlp_only_layers=[1], decoder_sparse_step=1)
    with pytest.raises(ConfigError, match=r"^rollout.backend: sglang builds every layer .*mlp_only_layers=\[1\]"):
        load_config(CONFIG, [f"model.hf_path={dense_layers}", "rollout.backend=sglang", "rollout.mode=streaming"])
    load_config(CONFIG, [f"model.hf_path={dense_layers}", "rollout.backend=cpu"])  # our engine serves it
    all_moe = tmp_path / "all_moe"
    all_moe.mkdir()
    (all_moe / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4,
                                                     "moe_intermediate_size": 32, "mlp_only_layers": [],
                                                     "decoder_sparse_step": 1}))
    load_config(CONFIG, [f"model.hf_path={all_moe}", "rollout.backend=sglang", "rollout.mode=streaming"])  # served
    with pytest.raises(ConfigError, match=r"^rollout.backend: vllm 0.32 on CPU .* reloads their weights wrongly"):
        load_config(CONFIG, [f"model.hf_path={all_moe}", "rollout.backend=vllm"])
    # an engine someone else started (e.g. on GPUs) is not judged by this machine
    load_config(CONFIG, [f"model.hf_path={all_moe}", "rollout.backend=vllm", "rollout.engine_urls=[http://x:1]"])
