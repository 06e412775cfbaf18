"""torchrun worker for tests/test_nonfinite.py: skipped non-finite updates leave everything bit-identical.

Environment: ``HF`` (tiny model), ``OUT`` (rank 0 writes a JSON report), ``TP`` (1 or 2), ``VARIANTS`` (comma
list of ``regular-fp32``, ``regular-bf16``, ``distopt-bf16``...), ``CKPT`` (a checkpoint root for the save-guard
check, optional).

For each variant: actor A runs good, [NaN policy loss in micro-batch 1 of the last DP rank], [inf gradient in
one parameter shard of rank 1 only], [NaN ratio], [NaN entropy], good; actor B (fresh, same weights) runs
good, good. Every bad update must be skipped on all ranks with the local state (parameters, fp32 master
parameters, Adam moments and step, LR scheduler) bit-equal to the state before it; A's final state must equal
B's bit for bit. The test hook is ``actor.test_injection`` (see nonfinite.TEST_NONFINITE_ENV). Then, on
the last variant's clean actor: the checkpoint save guard (with ``CKPT``) and, as a control, megatron-core's
unguarded ``optimizer.step()`` on NaN gradients.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist_scripts"))

from ckpt_worker import make_batch  # noqa: E402  (the checkpoint tests' batch: same seed, shapes and fields)


def build(variant, tp):
    from megatron_dapo.actor.megatron_actor import MegatronActor
    from megatron_dapo.config import ActorConfig

    opt, dtype = variant.split("-")
    cfg = ActorConfig(tensor_model_parallel_size=tp, lr=1e-2, lr_warmup_steps=0, max_tokens_per_gpu=64,
                      weight_decay=0.01, lr_decay_style="linear", micro_batch_size=1, clip_grad=1.0,
                      params_dtype=dtype, use_distributed_optimizer=opt == "distopt")
    return MegatronActor(os.environ["HF"], cfg, total_train_steps=10, seed=1234)


def local_state(actor):
    """Everything an update may change on this rank."""
    st = {}
    for ci, c in enumerate(actor.chunks):
        for n, p in c.named_parameters():
            st[f"param/{ci}/{n}"] = p.detach().clone()
    for oi, o in enumerate(actor.optimizer.chained_optimizers):
        inner = o.optimizer
        for gi, g in enumerate(inner.param_groups):
            st[f"lr/{oi}/{gi}"] = g["lr"]
            for pi, p in enumerate(g["params"]):
                st[f"main/{oi}/{gi}/{pi}"] = p.detach().clone()
                for k, v in inner.state.get(p, {}).items():
                    st[f"state/{oi}/{gi}/{pi}/{k}"] = v.detach().clone() if hasattr(v, "detach") else v
    st["scheduler"] = dict(actor.scheduler.state_dict())
    return st


def diff(a, b):
    """Keys whose values differ (bitwise for tensors)."""
    import torch

    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        same = torch.equal(x, y) if torch.is_tensor(x) else x == y
        if not same:
            bad.append(k)
    return bad


def gather(obj):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_variant(variant, tp, b, ls):
    import torch

    actor = build(variant, tp)
    last_dp = actor.dp_size - 1
    steps = [
        ("good", None),
        ("nan_policy_loss", {"kind": "loss", "term": "policy_loss", "micro_batch": 1, "dp_rank": last_dp}),
        ("inf_grad_shard", {"kind": "grad", "rank": 1, "param_index": 0, "value": "inf"}),
        ("nan_ratio", {"kind": "loss", "term": "ratio", "micro_batch": 0, "dp_rank": 0}),
        ("nan_entropy", {"kind": "loss", "term": "entropy", "micro_batch": 1, "dp_rank": 0}),
        ("good", None),
    ]
    rep = {"updates": []}
    for name, spec in steps:
        before = local_state(actor)
        actor.test_injection = None if spec is None else dict(spec, updates=[actor.num_updates])
        m = actor.train_step(b, ls)
        chk = actor.last_nonfinite
        changed = diff(before, local_state(actor))
        rep["updates"].append({"name": name, "skipped": chk.skipped, "terms": list(chk.terms),
                               "grad_norm_flag": chk.grad_norm, "micro_batches": chk.micro_batches,
                               "metrics": {k: v for k, v in m.items()
                                           if k.startswith(("update_skipped", "nonfinite_"))},
                               "grad_norm": m["grad_norm"], "changed": len(changed), "changed_keys": changed[:5],
                               "describe": chk.describe()})
    final_a = local_state(actor)
    actor.close()
    ref = build(variant, tp)
    for _ in range(2):
        ref.test_injection = None
        ref.train_step(b, ls)
    final_b = local_state(ref)
    rep["final_vs_clean"] = diff(final_a, final_b)[:5]
    rep["final_finite"] = all(bool(torch.isfinite(v).all()) for k, v in final_a.items()
                              if torch.is_tensor(v) and v.is_floating_point())
    return rep, ref


def main():
    import torch
    import torch.distributed as dist

    from megatron_dapo.actor import checkpoint as ck
    from megatron_dapo.actor.megatron_actor import LossSettings

    tp = int(os.environ.get("TP", "1"))
    b, ls = make_batch(), LossSettings()
    report = {}
    ref = None
    for variant in os.environ["VARIANTS"].split(","):
        rep, ref = run_variant(variant, tp, b, ls)
        report[variant] = gather(rep)
        if variant != os.environ["VARIANTS"].split(",")[-1]:
            ref.close()
    # save guard: a NaN in one rank's parameters -> every rank refuses, the previous checkpoint stays latest
    if os.environ.get("CKPT"):
        root = os.environ["CKPT"]
        ck.save_checkpoint(ref, root, 1, {"step": 1})
        with torch.no_grad():
            if dist.get_rank() == 1:
                next(ref.chunks[0].parameters()).view(-1)[0] = float("nan")
        try:
            ck.save_checkpoint(ref, root, 2, {"step": 2})
            err = None
        except ck.NonFiniteCheckpointError as e:
            err = str(e)
        report["save_guard"] = gather({"error": err, "latest": str(ck.latest_checkpoint(root)),
                                       "entries": sorted(p.name for p in Path(root).iterdir())})
    # control: megatron-core's own step() with a NaN gradient reports success and writes NaN (issue premise)
    for m in ref.chunks:
        m.zero_grad_buffer()
    for p in ref.chunks[0].parameters():
        if p.requires_grad:
            p.main_grad.fill_(float("nan"))
    ok, norm, _ = ref.optimizer.step()
    report["unguarded_step"] = gather({"reported_ok": bool(ok), "norm": float(norm) if norm is not None else None,
                                       "params_nan": any(bool(torch.isnan(p).any()) for c in ref.chunks
                                                         for p in c.parameters())})
    ref.close()
    if dist.get_rank() == 0:
        Path(os.environ["OUT"]).write_text(json.dumps(report, indent=1, default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
