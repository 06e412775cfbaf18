"""torchrun worker for tests/test_actor_checkpoint.py.

``STEPS`` is a JSON list run in order, each step building a fresh :class:`MegatronActor` on ``HF``:

* ``{"op": "save", "ckpt": root, "step": n, "tp":.., "pp":.., "vpp":.., "distopt": 0|1, "fmt": ..}``: one Adam
  step, save (trainer_state ``{"step": n, "data_pos": 17}``), log-probs, then one more step and the
  resulting parameters (reference for exact resume);
* ``{"op": "load", "ckpt": root_or_dir, "load_optimizer": 0|1, ...}``: load (fresh actor, other seed,
  no HF weights), log-probs, and with the optimizer one more step and the resulting parameters;
* ``{"op": "layout_error", ...}``: load with the optimizer expecting ``CheckpointLayoutError``;
* ``{"op": "kill_save", "ckpt": root, "at": "before_rename"|"before_latest"}``: save step 1, then
  save step 2 with the kill hook armed (rank 0 exits with code 17 mid-save); the full state after the
  first save (ckpt_kill_worker.snapshot) goes to ``OUT.ref``. ``"snapshot": 1`` on a load adds the
  loaded full state as ``state``.

Rank 0 writes the list of per-step results to ``OUT`` (torch.save) after every step.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_batch():
    import torch

    from megatron_dapo.actor.batching import build_actor_batch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 7, 3, 9)]
    resps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (6, 2, 8, 4)]
    b = build_actor_batch(prompts, resps)
    b.old_logprobs = (torch.randn(b.input_ids.shape, generator=g) * 0.1 - 5.0) * b.response_mask
    b.advantages = torch.randn(len(prompts), 1, generator=g).expand(b.input_ids.shape).contiguous() * b.response_mask
    return b


def build(step, load_weights):
    from megatron_dapo.actor.megatron_actor import MegatronActor
    from megatron_dapo.config import ActorConfig

    cfg = ActorConfig(tensor_model_parallel_size=int(step.get("tp", 1)),
                      pipeline_model_parallel_size=int(step.get("pp", 1)),
                      virtual_pipeline_model_parallel_size=step.get("vpp"), lr=1e-2, lr_warmup_steps=0,
                      max_tokens_per_gpu=64, weight_decay=0.01, lr_decay_style="linear",
                      use_distributed_optimizer=bool(step.get("distopt", 0)),
                      dist_optimizer_ckpt_format=step.get("fmt", "dp_reshardable"))
    return MegatronActor(os.environ["HF"], cfg, total_train_steps=10, seed=1234 if load_weights else 99,
                         load_weights=load_weights)


def params(actor):
    return {n: t.clone() for n, t in actor.iter_hf_tensors()}


def main():
    import torch
    import torch.distributed as dist

    from megatron_dapo.actor import checkpoint as ck
    from megatron_dapo.actor.megatron_actor import LossSettings

    b = make_batch()
    ls = LossSettings()
    out = []
    for step in json.loads(os.environ["STEPS"]):
        op = step["op"]
        r = {"op": op}
        actor = build(step, load_weights=op in ("save", "kill_save"))
        if op == "save":
            actor.train_step(b, ls)
            ck.save_checkpoint(actor, step["ckpt"], step.get("step", 1), {"step": step.get("step", 1), "data_pos": 17})
            r["logprobs"] = actor.compute_logprobs(b)[0]
            r["params_before_next"] = params(actor)
            r["lr_next"] = actor.train_step(b, ls)["lr"]
            r["params_next"] = params(actor)
            r["rng_next"] = torch.rand(3)
        elif op == "load":
            lo = bool(step.get("load_optimizer", 1))
            r["trainer_state"] = ck.load_checkpoint(actor, step["ckpt"], load_optimizer=lo)
            if step.get("snapshot"):
                from ckpt_kill_worker import snapshot
                r["state"] = snapshot(actor)
            r["rng_next"] = torch.rand(3)
            r["logprobs"] = actor.compute_logprobs(b)[0]
            if lo:
                r["params_before_next"] = params(actor)
                r["lr_next"] = actor.train_step(b, ls)["lr"]
                r["params_next"] = params(actor)
        elif op == "layout_error":
            try:
                ck.load_checkpoint(actor, step["ckpt"], load_optimizer=True)
                r["error"] = None
            except ck.CheckpointLayoutError as e:
                r["error"] = str(e)
        elif op == "kill_save":
            actor.train_step(b, ls)
            ck.save_checkpoint(actor, step["ckpt"], 1, {"step": 1})
            from ckpt_kill_worker import snapshot
            torch.save(snapshot(actor), os.environ["OUT"] + ".ref")  # the state a load must restore
            actor.train_step(b, ls)
            os.environ["MEGATRON_DAPO_CKPT_KILL_AT"] = step["at"]
            ck.save_checkpoint(actor, step["ckpt"], 2, {"step": 2})
            r["error"] = "not killed"
        actor.close()
        out.append(r)
        if dist.get_rank() == 0:
            torch.save(out, os.environ["OUT"])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
