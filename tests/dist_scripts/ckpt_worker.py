"""torchrun worker for tests/test_actor_checkpoint.py (one launch per phase; results as a .pt file).

Env: PHASE (save | load | resume_ref | kill_save), TP, PP, VPP, DISTOPT, HF, CKPT, OUT.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _batch(actor_cls_mod):
    import torch

    from megatron_dapo.actor.batching import build_actor_batch

    g = torch.Generator().manual_seed(0)
    lp_, lr_ = (5, 7, 3, 9), (6, 2, 8, 4)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in lp_]
    resps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in lr_]
    b = build_actor_batch(prompts, resps)
    b.old_logprobs = torch.randn(b.input_ids.shape, generator=g) * 0.1 - 5.0
    b.advantages = torch.randn(len(prompts), 1, generator=g).expand(b.input_ids.shape).contiguous() * b.response_mask
    return b


def main():
    import torch
    import torch.distributed as dist

    from megatron_dapo.actor import checkpoint as ck
    from megatron_dapo.actor.megatron_actor import LossSettings, MegatronActor
    from megatron_dapo.config import ActorConfig

    env = os.environ
    cfg = ActorConfig(tensor_model_parallel_size=int(env.get("TP", 1)), pipeline_model_parallel_size=int(env.get("PP", 1)),
                      virtual_pipeline_model_parallel_size=int(env["VPP"]) if env.get("VPP") else None,
                      lr=1e-2, lr_warmup_steps=0, max_tokens_per_gpu=64, weight_decay=0.01,
                      use_distributed_optimizer=env.get("DISTOPT") == "1")
    phase = env["PHASE"]
    actor = MegatronActor(env["HF"], cfg, total_train_steps=10, seed=int(env.get("SEED", 1234)),
                          load_weights=phase != "load")
    b = _batch(None)
    ls = LossSettings()
    res = {}
    if phase == "save":
        actor.train_step(b, ls)  # non-trivial optimizer state
        res["logprobs"] = actor.compute_logprobs(b)[0]
        ck.save_checkpoint(actor, env["CKPT"], 1, {"step": 1, "data_pos": 17})
        actor.train_step(b, ls)
        res["params_after_next_step"] = {n: t.clone() for n, t in actor.iter_hf_tensors()}
    elif phase == "load":
        state = ck.load_checkpoint(actor, env["CKPT"], load_optimizer=env.get("LOADOPT", "1") == "1")
        res["trainer_state"] = state
        res["logprobs"] = actor.compute_logprobs(b)[0]
        if env.get("LOADOPT", "1") == "1":
            actor.train_step(b, ls)
            res["params_after_next_step"] = {n: t.clone() for n, t in actor.iter_hf_tensors()}
    elif phase == "kill_save":
        actor.train_step(b, ls)
        ck.save_checkpoint(actor, env["CKPT"], 1, {"step": 1})
        actor.train_step(b, ls)
        ck.save_checkpoint(actor, env["CKPT"], 2, {"step": 2})  # killed by the env hook
    elif phase == "layout_error":
        try:
            ck.load_checkpoint(actor, env["CKPT"], load_optimizer=True)
            res["error"] = None
        except ck.CheckpointLayoutError as e:
            res["error"] = str(e)
    if dist.get_rank() == 0 and env.get("OUT"):
        torch.save(res, env["OUT"])
    dist.barrier()
    actor.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
