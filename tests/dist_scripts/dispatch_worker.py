"""torchrun worker (nproc=2, DP=2, gloo) for tests/test_batch_dispatch.py: the sharded batch path equals
the full-batch path of the Megatron actor.

Full path (every rank holds the whole batch): ``build_train_batch`` -> ``compute_logprobs`` -> for each
mini-batch of a ``randperm``: ``train_step`` (the actor splits over DP itself). Sharded path: rank 0 alone
builds the flat rows and the plan (``plan_step``), ``Dispatcher.dispatch`` sends each DP rank its rows,
and the actor runs with ``local=True`` and the plan's global counts. For both loss aggregation modes the
DP-reduced gradients (``apply_update=False``) and loss metrics of every update are compared. Two groups hold
continued partial-rollout samples (``token_versions`` with an older prefix), and both paths leave their
off-policy prefixes out of the loss (``mask_offpolicy_prefix``): the per-token mask travels with the rows
and the plan's token counts leave the masked tokens out. Rank 0 writes a JSON report to ``OUT``.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_groups():
    import torch

    from megatron_dapo.algorithm import Group

    g = torch.Generator().manual_seed(5)
    rnd = lambda n: torch.randint(0, 300, (n,), generator=g).tolist()  # noqa: E731
    groups = []
    for p in range(4):
        lens = [3 + (5 * p + 3 * j) % 11 for j in range(4)]
        if p == 2:
            lens[1] = 0  # an empty response
        resps = [rnd(n) for n in lens]
        # groups 0 and 3: responses 0 and 2 were continued, their first 2 tokens from weight version 0
        versions = [[[0, 2, 0], [2, n, 1]] if p in (0, 3) and j in (0, 2) else ([[0, n, 1]] if n else [])
                    for j, n in enumerate(lens)]
        groups.append(Group(prompt_index=p, prompt_ids=rnd(3 + p), responses=resps,
                            rewards=[1.0, -1.0, -1.0, 1.0] if p % 2 else [-1.0, -0.5, 1.0, -1.0],
                            correct=[True, False, False, True] if p % 2 else [False, False, True, False],
                            finish_reasons=["length" if (p, j) == (1, 2) else "stop" for j in range(4)],
                            rollout_logprobs=[(-torch.rand(len(r), generator=g)).tolist() for r in resps],
                            token_versions=versions))
    return groups


def main():
    import torch
    import torch.distributed as dist

    from ckpt_worker import build
    from megatron_dapo.actor.dispatch import Dispatcher, plan_step, shard_for
    from megatron_dapo.actor.megatron_actor import LossSettings
    from megatron_dapo.algorithm import flatten_groups as flatten_all
    from megatron_dapo.algorithm import resolve_preset

    def flatten_groups(groups, sw):
        return flatten_all(groups, sw, mask_offpolicy_prefix=True)

    def build_train_batch(groups, sw):
        return flatten_groups(groups, sw).to_actor_batch()

    actor = build({}, load_weights=True)
    rank = dist.get_rank()
    sw = resolve_preset("dapo", {"overlong_filtering": True})
    groups = make_groups()
    mb_size, epochs, seed = 6, 2, 11

    def grads():
        return {n: t.clone() for n, t in actor.iter_full_grads()}

    def rel(a, b):
        return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b) if b else 0.0

    # ---- full path (today's): the whole batch on every rank
    full = build_train_batch(groups, sw)
    full_lp, _ = actor.compute_logprobs(full)
    full.old_logprobs = full_lp
    ref = {}
    for mode in ("token-mean", "seq-mean-token-mean"):
        gen = torch.Generator().manual_seed(seed)
        ref[mode] = []
        for _ in range(epochs):
            perm = torch.randperm(len(full), generator=gen)
            for s in range(0, len(full), mb_size):
                m = actor.train_step(full.select(perm[s: s + mb_size]), LossSettings(loss_agg_mode=mode),
                                     apply_update=False)
                ref[mode].append((m, grads()))

    # ---- sharded path: rank 0 builds and plans, each DP rank receives its rows only
    flat = plan = None
    if rank == 0:
        flat = flatten_groups(groups, sw)
        plan = plan_step(flat, mini_batch_size=mb_size, ppo_epochs=epochs, dp_size=actor.dp_size,
                         generator=torch.Generator().manual_seed(seed))
    shard = Dispatcher(actor.dp_rank, actor.dp_size).dispatch(flat, plan)
    # what rank 0 would have sent: recomputed here for the check only
    expect = shard_for(flatten_groups(groups, sw), plan_step(flatten_groups(groups, sw), mini_batch_size=mb_size,
                       ppo_epochs=epochs, dp_size=actor.dp_size, generator=torch.Generator().manual_seed(seed)),
                       actor.dp_rank)
    fields = ("tokens", "offsets", "prompt_lengths", "advantages", "loss_weights", "rollout_logprobs", "token_mask")
    same_shard = all(torch.equal(getattr(shard.batch, f), getattr(expect.batch, f)) for f in fields)
    same_shard = same_shard and shard.updates == expect.updates and torch.equal(shard.owned, expect.owned)
    rows = plan_step(flatten_groups(groups, sw), mini_batch_size=mb_size, ppo_epochs=epochs, dp_size=actor.dp_size,
                     generator=torch.Generator().manual_seed(seed)).rank_rows[actor.dp_rank]
    local = shard.batch.to_actor_batch()
    local_lp, _ = actor.compute_logprobs(local, local=True)
    ref_rows = full.select(rows)
    lp_diff = float((local_lp - ref_rows.old_logprobs).abs().max())
    adv_same = torch.equal(local.advantages, ref_rows.advantages) and torch.equal(local.response_mask,
                                                                                  ref_rows.response_mask)
    local.old_logprobs = ref_rows.old_logprobs  # the same old log-probs as the full path: compare the update
    report = {"same_shard": bool(same_shard), "lp_diff": lp_diff, "adv_same": bool(adv_same),
              "rows_per_rank": len(rows), "n_rows": len(full),
              # prefix tokens in the loss without the mask and out of it with the mask (expected: 8)
              "masked_prefix_tokens": int(((flatten_all(groups, sw).to_actor_batch().response_mask > 0)
                                           & (full.response_mask == 0)).sum())}
    for mode in ("token-mean", "seq-mean-token-mean"):
        worst_g, worst_m = 0.0, 0.0
        for upd, (m_ref, g_ref) in zip(shard.updates, ref[mode]):
            m = actor.train_step(local.select(list(upd.rows)), LossSettings(loss_agg_mode=mode),
                                 global_num_tokens=upd.num_tokens, global_num_seqs=upd.num_seqs,
                                 apply_update=False, local=True)
            worst_g = max(worst_g, rel(grads(), g_ref))
            worst_m = max(worst_m, max(abs(m[k] - m_ref[k]) for k in ("pg_loss", "entropy", "pg_clipfrac")))
        report[mode] = {"grad_rel": worst_g, "metric_diff": worst_m, "updates": len(shard.updates),
                        "ref_grad_norm": float(sum(t.norm() ** 2 for t in ref[mode][0][1].values()) ** 0.5)}
    try:
        actor.train_step(local, LossSettings(), local=True)
        report["local_without_counts_raises"] = False
    except ValueError as e:
        report["local_without_counts_raises"] = "global_num_tokens" in str(e)
    if rank == 0:
        Path(os.environ["OUT"]).write_text(json.dumps(report))
    dist.barrier()
    actor.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
