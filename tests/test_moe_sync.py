"""Weight sync of Qwen3-MoE weights (issue 21 item 3): experts gathered over expert parallelism into the engines'
per-expert HF names, bucketed, over ``disk``, ``tensor`` and ``distributed``.

* the CPU engine (transformers 5 keeps a MoE layer's experts fused: ``mlp.experts.gate_up_proj`` ``[E, 2I, H]``)
  loads, checks and reads back the checkpoint's per-expert names (``megatron_dapo.engines.cpu.model``);
* one ``torchrun --nproc_per_node=2`` launch (``tests/sync_scripts/moe_sync_worker.py``, gloo): an
  ``actor.expert_model_parallel_size=2`` actor after one train step pushes to a CPU engine over each transport;
  every engine tensor equals the actor's export and the engine's log-probs equal the actor's (<= 1e-4, the
  trainer's ``weight_sync.check_logprobs`` bound; measured ~1e-6).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_scripts.moe_common import make_tiny_qwen3_moe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "sync_scripts" / "moe_sync_worker.py"
TRANSPORTS = ("disk", "tensor", "distributed")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    return make_tiny_qwen3_moe(tmp_path_factory.mktemp("moe_sync") / "tiny_moe")


def test_cpu_engine_takes_per_expert_names(tiny_moe):
    """Per-expert checkpoint names are views into the fused parameters: loaded, read back, checked complete."""
    from safetensors.torch import load_file

    from megatron_dapo.engines.cpu.model import CPUEngine, fused_expert_aliases

    sd = load_file(str(tiny_moe / "model.safetensors"))
    engine = CPUEngine(str(tiny_moe))
    try:
        # 2 MoE layers x 4 experts x {gate, up, down}
        assert len(engine.expert_aliases) == 24 == len(fused_expert_aliases(engine.model))
        experts = engine.model.model.layers[0].mlp.experts
        assert tuple(experts.gate_up_proj.shape) == (4, 64, 64) and tuple(experts.down_proj.shape) == (4, 64, 32)
        table = engine.param_table()
        assert all(torch.equal(table[k], v) for k, v in sd.items())  # what from_pretrained fused, read back by name
        doubled = {k: 2 * v for k, v in sd.items()}
        assert engine.update_weights(doubled, "x2", require_complete=True, source="test").endswith("weight_version=x2")
        assert torch.equal(experts.gate_up_proj[3, :32], doubled["model.layers.0.mlp.experts.3.gate_proj.weight"])
        assert torch.equal(experts.gate_up_proj[3, 32:], doubled["model.layers.0.mlp.experts.3.up_proj.weight"])
        assert torch.equal(experts.down_proj[1], doubled["model.layers.0.mlp.experts.1.down_proj.weight"])
        # a subset by name (what a broadcast bucket holds) touches only its slices
        engine.load_named_tensors({"model.layers.2.mlp.experts.0.up_proj.weight": sd[
            "model.layers.2.mlp.experts.0.up_proj.weight"]}, require_complete=False)
        fused = engine.model.model.layers[2].mlp.experts.gate_up_proj
        assert torch.equal(fused[0, 32:], sd["model.layers.2.mlp.experts.0.up_proj.weight"])
        assert torch.equal(fused[0, :32], doubled["model.layers.2.mlp.experts.0.gate_proj.weight"])
        partial = dict(doubled)
        del partial["model.layers.2.mlp.experts.3.up_proj.weight"]
        with pytest.raises(ValueError, match=r"misses parameter\(s\): \['model.layers.2.mlp.experts.gate_up_proj'\]"):
            engine.load_named_tensors(partial, require_complete=True)
        with pytest.raises(ValueError, match=r"experts.0.down_proj.weight: got \(32, 64\), model has \(64, 32\)"):
            engine.load_named_tensors({"model.layers.0.mlp.experts.0.down_proj.weight": torch.zeros(32, 64)},
                                      require_complete=False)
        with pytest.raises(ValueError, match="unknown parameter"):
            engine.load_named_tensors({"model.layers.1.mlp.experts.0.down_proj.weight": torch.zeros(64, 32)},
                                      require_complete=False)  # layer 1 is dense (mlp_only_layers)
    finally:
        engine.stop()


def test_dense_models_get_no_aliases(tiny_moe, tmp_path):
    from helpers import _write_tiny_hf
    from transformers import AutoModelForCausalLM

    from megatron_dapo.engines.cpu.model import fused_expert_aliases

    dense = AutoModelForCausalLM.from_pretrained(str(_write_tiny_hf(tmp_path / "q3", family="qwen3")))
    assert fused_expert_aliases(dense) == {}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ep2_actor_pushes_moe_weights_over_every_transport(tiny_moe, tmp_path):
    from megatron_dapo.engines.launch_common import find_free_ports
    from megatron_dapo.engines.launch_cpu import launch_cpu_engines

    with launch_cpu_engines(str(tiny_moe), 1, log_dir=tmp_path / "logs") as engines:
        env = dict(os.environ, CKPT=str(tiny_moe), ENGINE_URLS=",".join(engines.urls), WORK_DIR=str(tmp_path / "w"),
                   TRANSPORTS=",".join(TRANSPORTS), BUCKET_MB="0.02", WORKER_TIMEOUT_S="240", OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master_port={find_free_ports(1)[0]}", str(WORKER)], env=env, cwd=str(REPO),
                              capture_output=True, text=True, timeout=280)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "MOE_SYNC_OK" in proc.stdout, out[-6000:]
    results = [json.loads(x[len("RESULT "):]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert [r["case"] for r in results] == [f"moe-{t}" for t in TRANSPORTS]
    for r in results:
        assert r["expert_tensors"] == 24 and r["tensors"] == 56, r  # of the checkpoint's 56 HF tensors
        assert r["rollout/train_rollout_logprob_abs_diff_max"] <= 1e-4, r
        assert r["weight_sync/num_buckets"] > 1, r  # 0.02 MiB buckets: the experts travel in several
    assert os.listdir(tmp_path / "w") == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_two_steps_ep2_with_logprob_check(tmp_path_factory, tmp_path):
    """``megatron-dapo train`` on the tiny-cpu demo with a tiny Qwen3-MoE (the demo tokenizer's vocabulary),
    ``actor.expert_model_parallel_size=2`` under ``torchrun --nproc-per-node=2``, ``weight_sync.check_logprobs``:
    both steps train and after each push the engine's log-probs equal the actor's (<= 1e-4)."""
    from dist_scripts.moe_common import make_engine_moe
    from helpers import fail_message, read_steps, run_train, shared_tiny_model

    moe = make_engine_moe(tmp_path / "tiny-moe", shared_tiny_model(tmp_path_factory))
    out = tmp_path / "out"
    proc = run_train([f"model.hf_path={moe}", "model.make_tiny=false", f"output_dir={out}",
                      "actor.expert_model_parallel_size=2", "trainer.total_steps=2", "trainer.save_interval=0",
                      "trainer.eval_interval=0", "weight_sync.check_logprobs=true", "rollout.rollout_batch_size=4"],
                     nproc=2, timeout=540)
    assert proc.returncode == 0, fail_message(proc)
    steps = read_steps(out / "tiny-cpu")
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert s["weight_sync/engine_actor_logprob_max_abs_diff"] <= 1e-4, s
        assert s["rollout/train_rollout_logprob_abs_diff_max"] <= 1e-4, s
