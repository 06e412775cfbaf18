"""torchrun worker for tests/test_weight_sync.py: every CPU transport × bucket size after a train step.

Environment: TP, PP, VPP (optional), EQUAL_LENGTHS (1 = same-length sequences), MAXTOK, CKPT (HF dir the actor and the engines started from), ENGINE_URLS
(comma-separated), WORK_DIR, TRANSPORTS (comma list), BUCKETS_MB (comma list; 0 = unbounded).
Rank 0 prints one ``RESULT {json}`` line per sync and ``SYNC_WORKER_OK`` at the end; any failed check
raises (non-zero exit).
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
from megatron_dapo.sync import WeightSync, rollout_logprob_mismatch  # noqa: E402


def engine_tensor(client, name):
    """{url: fp32 tensor} of one engine parameter, read back through /get_weights_by_name."""
    res = client.get_weights_by_name(name, truncate_size=1 << 30)
    return {u: torch.tensor(v, dtype=torch.float64).to(torch.float32) for u, v in res.items()}


def assert_engine_tensors_equal(client, ref: dict, version: str) -> None:
    """Every engine's copy of each tensor of ``ref`` (``{HF name: fp32 tensor}``) is bit-equal to it; raises
    AssertionError naming the version, tensor, engine and the largest difference."""
    for name, want in ref.items():
        for url, got in engine_tensor(client, name).items():
            if not torch.equal(got, want):
                raise AssertionError(f"{version}: {name} on {url} differs, max abs "
                                     f"{(got - want).abs().max().item():.3e}")


def engine_logprob_mismatch(client, prompts, seqs, lp, response_mask) -> dict:
    """The engine's log-probs of ``seqs`` (prompt + response ids) against the actor's ``lp`` ([B, L] fp32, response
    positions after each prompt), as ``rollout_logprob_mismatch``'s metrics (the trainer's logprob check)."""
    scored = client.score(seqs, [len(p) for p in prompts])
    eng = torch.zeros_like(lp)
    for i, (p, s) in enumerate(zip(prompts, scored)):
        eng[i, len(p):len(p) + len(s)] = torch.tensor(s, dtype=torch.float32)
    return rollout_logprob_mismatch(lp, eng, response_mask)


def train_one_step_from_env():
    """The actor on ``CKPT`` at ``TP``/``PP``/``VPP`` after one DAPO step on a fixed batch.

    Returns ``(actor, prompts, resps, batch, ref, lp)``: ``ref`` the exported fp32 HF tensors after the
    step and ``lp`` the actor's log-probs of ``batch`` (what the engines must reproduce).
    """
    ckpt = os.environ["CKPT"]
    vpp = int(os.environ["VPP"]) if os.environ.get("VPP") else None
    cfg = ActorConfig(tensor_model_parallel_size=int(os.environ.get("TP", 1)),
                      pipeline_model_parallel_size=int(os.environ.get("PP", 1)),
                      virtual_pipeline_model_parallel_size=vpp, lr=3e-2, lr_warmup_steps=0, weight_decay=0.0,
                      clip_grad=0.0, max_tokens_per_gpu=int(os.environ.get("MAXTOK", 64)))
    actor = MegatronActor(ckpt, cfg)
    g = torch.Generator().manual_seed(0)
    vocab = actor.spec.vocab_size
    prompt_lens, resp_lens = (5, 7, 3, 9), (6, 2, 8, 4)
    if os.environ.get("EQUAL_LENGTHS") == "1":
        # interleaved (VPP) training on CPU/gloo is only reliable with equal micro-batch shapes
        prompt_lens, resp_lens = (6, 6, 6, 6), (5, 5, 5, 5)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in prompt_lens]
    resps = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in resp_lens]
    batch = build_actor_batch(prompts, resps)
    lp0, _ = actor.compute_logprobs(batch)
    batch.old_logprobs = lp0
    batch.advantages = torch.randn(len(prompts), 1, generator=g).expand_as(lp0).contiguous() * batch.response_mask
    actor.train_step(batch, LossSettings(), apply_update=True)
    ref = {n: t.clone() for n, t in actor.iter_hf_tensors(torch.float32)}
    lp, _ = actor.compute_logprobs(batch)
    return actor, prompts, resps, batch, ref, lp


def main():
    t_start = time.time()
    # a hang (e.g. a mismatched collective) dumps every thread's stack and exits instead of blocking CI
    faulthandler.dump_traceback_later(float(os.environ.get("WORKER_TIMEOUT_S", 200)), exit=True)
    actor, prompts, resps, batch, ref, lp = train_one_step_from_env()
    rank = dist.get_rank()

    urls = os.environ["ENGINE_URLS"].split(",")
    client = SyncEngineClient(urls) if rank == 0 else None
    seqs = [p + r for p, r in zip(prompts, resps)]
    transports = os.environ.get("TRANSPORTS", "distributed,disk").split(",")
    buckets = [float(x) for x in os.environ.get("BUCKETS_MB", "0.05,1,0").split(",")]
    cases = [(t, b, torch.float32) for t in transports for b in buckets]
    if "distributed" in transports:
        cases.append(("distributed", 0.25, torch.bfloat16))
    for transport, bucket_mb, dtype in cases:
        version = f"{transport}-{bucket_mb}-{str(dtype).split('.')[-1]}"
        if rank == 0:
            client.update_weights_from_disk(os.environ["CKPT"], "reset")  # back to the pre-training weights
            probe = "model.layers.0.mlp.down_proj.weight"
            before = engine_tensor(client, probe)
            assert all(not torch.equal(t, ref[probe]) for t in before.values()), "train step changed nothing"
        ws = WeightSync(actor, client, transport=transport, bucket_mb=bucket_mb, dtype=dtype,
                        work_dir=os.environ["WORK_DIR"], timeout_s=120)
        metrics = ws.sync(version)
        if rank == 0:
            versions = client.get_weight_version()
            assert set(versions.values()) == {version}, versions
            assert_engine_tensors_equal(client, {n: t.to(dtype).to(torch.float32) for n, t in ref.items()}, version)
            mism = {}
            if dtype == torch.float32:
                mism = engine_logprob_mismatch(client, prompts, seqs, lp, batch.response_mask)
                assert mism["rollout/train_rollout_logprob_abs_diff_max"] <= 1e-5, mism
            print("RESULT " + json.dumps({"case": version, **metrics, **mism}), flush=True)
        ws.close()
        if rank == 0 and transport == "disk":
            leftovers = os.listdir(os.environ["WORK_DIR"])
            assert leftovers == [], f"disk transport left files behind: {leftovers}"
        dist.barrier()
    if rank == 0:
        client.close()
        print(f"SYNC_WORKER_OK {time.time() - t_start:.1f}s", flush=True)
    actor.close()


if __name__ == "__main__":
    main()
