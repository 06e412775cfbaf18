"""torchrun worker for tests/test_moe_sync.py: an EP=2 Qwen3-MoE actor pushes to a CPU engine over every transport.

``torchrun --nproc_per_node=2`` (gloo): ``MegatronActor`` with ``actor.expert_model_parallel_size=2`` (each rank
holds 2 of the 4 experts, data-parallel size 2) trains one DAPO step, then for each transport of ``TRANSPORTS``
the engine is reset to the pre-training checkpoint, :class:`~megatron_dapo.sync.WeightSync` pushes the actor's
weights (per-expert HF names ``model.layers.N.mlp.experts.<e>.{gate,up,down}_proj.weight``, ``mlp.gate.weight``;
bucket ``BUCKET_MB``), and rank 0 checks every engine tensor bit-equal to the actor's export and the engine's
log-probs of the training batch against the actor's (``rollout_logprob_mismatch``, the trainer's
``weight_sync.check_logprobs`` quantity).

Environment: CKPT (the tiny Qwen3-MoE the actor and the engine started from), ENGINE_URLS (comma-separated),
WORK_DIR, TRANSPORTS (comma list), BUCKET_MB. Rank 0 prints one ``RESULT {json}`` line per push and
``MOE_SYNC_OK`` at the end; a failed check raises (non-zero exit).
"""
import faulthandler
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron_dapo.actor.batching import build_actor_batch  # noqa: E402
from megatron_dapo.actor.megatron_actor import LossSettings, MegatronActor  # noqa: E402
from megatron_dapo.config import ActorConfig  # noqa: E402
from megatron_dapo.engines.client import SyncEngineClient  # noqa: E402
from megatron_dapo.sync import WeightSync  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sync_worker import assert_engine_tensors_equal, engine_logprob_mismatch, engine_tensor  # noqa: E402

PROBE = "model.layers.0.mlp.experts.3.down_proj.weight"
"""An expert held by expert-parallel rank 1 only: the push must carry it from there."""


def main():
    t_start = time.time()
    faulthandler.dump_traceback_later(float(os.environ.get("WORKER_TIMEOUT_S", 200)), exit=True)
    ckpt = os.environ["CKPT"]
    cfg = ActorConfig(expert_model_parallel_size=2, lr=3e-2, lr_warmup_steps=0, weight_decay=0.0, clip_grad=0.0,
                      max_tokens_per_gpu=32)
    actor = MegatronActor(ckpt, cfg)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    vocab = actor.spec.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 7, 3, 9)]
    resps = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (6, 2, 8, 4)]
    batch = build_actor_batch(prompts, resps)
    lp0, _ = actor.compute_logprobs(batch)
    batch.old_logprobs = lp0
    batch.advantages = torch.randn(len(prompts), 1, generator=g).expand_as(lp0).contiguous() * batch.response_mask
    actor.train_step(batch, LossSettings(), apply_update=True)
    ref = {n: t.clone() for n, t in actor.iter_hf_tensors(torch.float32)}  # collective: every rank
    lp, _ = actor.compute_logprobs(batch)
    if rank == 0:
        moved = float((lp - lp0).abs().max())
        assert moved > 1e-3, f"the train step hardly changed the log-probs ({moved:.2e}): the check would be vacuous"

    urls = os.environ["ENGINE_URLS"].split(",")
    client = SyncEngineClient(urls) if rank == 0 else None
    seqs = [p + r for p, r in zip(prompts, resps)]
    for transport in os.environ["TRANSPORTS"].split(","):
        version = f"moe-{transport}"
        if rank == 0:
            client.update_weights_from_disk(ckpt, "reset")  # back to the pre-training weights
            before = engine_tensor(client, PROBE)
            assert all(not torch.equal(t, ref[PROBE]) for t in before.values()), "train step changed no expert"
        ws = WeightSync(actor, client, transport=transport, bucket_mb=float(os.environ.get("BUCKET_MB", "0.02")),
                        dtype=torch.float32, work_dir=os.environ["WORK_DIR"], timeout_s=120)
        metrics = ws.sync(version)
        if rank == 0:
            assert set(client.get_weight_version().values()) == {version}
            assert_engine_tensors_equal(client, ref, version)
            mism = engine_logprob_mismatch(client, prompts, seqs, lp, batch.response_mask)
            n_expert = sum(1 for n in ref if ".mlp.experts." in n)
            print("RESULT " + json.dumps({"case": version, "expert_tensors": n_expert, "tensors": len(ref),
                                          **metrics, **mism}), flush=True)
        ws.close()
        dist.barrier()
    if rank == 0:
        client.close()
        print(f"MOE_SYNC_OK {time.time() - t_start:.1f}s", flush=True)
    actor.close()


if __name__ == "__main__":
    main()
