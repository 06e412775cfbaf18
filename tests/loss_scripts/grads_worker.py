"""Worker for tests/test_loss_exactness.py: one optimizer-free backward of the DAPO loss through the Megatron
actor for several micro-batch splits and loss modes, and for the token-mean loss with each behaviour-policy
correction the batch file names (``corrections``: name -> :class:`RolloutCorrection` keyword arguments); rank 0
saves the full (canonical-name) gradients."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


def main():
    import torch.distributed as dist

    from megatron_dapo.actor.batching import ActorBatch
    from megatron_dapo.actor.megatron_actor import LossSettings, MegatronActor
    from megatron_dapo.algorithm import RolloutCorrection
    from megatron_dapo.config import ActorConfig

    model_dir, batch_path, out_path = sys.argv[1:4]
    data = torch.load(batch_path)
    corrections = data.pop("corrections", {})
    batch = ActorBatch(**data)
    cases = {mode: LossSettings(loss_agg_mode=mode) for mode in ("token-mean", "seq-mean-token-mean")}
    cases.update({name: LossSettings(correction=RolloutCorrection(**kw)) for name, kw in corrections.items()})
    results = {}
    actor = None
    for name, loss in cases.items():
        for mbs in (8, 4, 2):
            cfg = ActorConfig(micro_batch_size=mbs, lr=0.0, lr_warmup_steps=0, clip_grad=0.0)
            if actor is None:
                actor = MegatronActor(model_dir, cfg)
            actor.cfg = cfg
            actor.train_step(batch, loss, apply_update=False)
            grads = {k: v.clone() for k, v in actor.iter_full_grads()}
            results[f"{name}/mbs{mbs}"] = grads
    if dist.get_rank() == 0:
        torch.save(results, out_path)
        print(json.dumps({"dp": actor.dp_size, "keys": sorted(results)}))


if __name__ == "__main__":
    main()
