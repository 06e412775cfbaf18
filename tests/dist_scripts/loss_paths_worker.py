"""torchrun worker (nproc=1) for tests/test_loss_paths.py: overlong filtering and the TIS cap
through the real trainer batch builder and the Megatron actor's ``train_step``.

* overlong filtering: groups with truncated responses (``finish_reason == "length"``) go through
  the trainer's batch builder (``build_train_batch``) with ``overlong_filtering`` on; the actor's gradient (``apply_update=False``,
  :meth:`iter_full_grads`) must not change when the truncated responses' tokens and advantages are
  replaced by anything else (no gradient flows from them), and must change when filtering is off;
* TIS cap: ``rollout_logprobs = old_logprobs - log(w_i)`` per row gives importance weights
  ``min(w_i, cap)``; the gradient must equal the no-TIS gradient of the same batch with advantages
  scaled by ``min(w_i, cap)`` (the policy loss is linear in a positive per-row weight), and differ from
  the uncapped one;
* off-policy corrections (``LossSettings.correction``'s ``seq_is_mask_*`` / ``icepop_*``): with ``rollout_logprobs ==
  old_logprobs`` every correction leaves the gradient bit-identical; rows whose ratio is outside the bounds
  contribute exactly as if their advantages were 0 (IcePop weights the kept rows by their ratio), and
  ``train_step`` reports the masked token fraction.

Writes a JSON report to ``OUT``.
"""
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    import torch
    import torch.distributed as dist

    from ckpt_worker import build
    from megatron_dapo.actor.megatron_actor import LossSettings
    from megatron_dapo.algorithm import Group, RolloutCorrection, build_train_batch, resolve_preset

    actor = build({}, load_weights=True)
    g = torch.Generator().manual_seed(3)
    rnd = lambda n: torch.randint(0, 300, (n,), generator=g).tolist()  # noqa: E731

    def groups(truncated_tokens):
        out = []
        for p in range(2):
            resps, reasons = [], []
            for j in range(4):
                trunc = j == 1  # one truncated response per group
                resps.append(truncated_tokens[(p, j)] if trunc else rnd(3 + j))
                reasons.append("length" if trunc else "stop")
            out.append(Group(prompt_index=p, prompt_ids=rnd(4 + p), responses=resps,
                             rewards=[1.0, -1.0, 1.0, -1.0] if p == 0 else [-1.0, -1.0, 1.0, 1.0],
                             correct=[True, False, True, False] if p == 0 else [False, False, True, True],
                             finish_reasons=reasons))
        return out

    def batch_of(gs, filtering):
        b = build_train_batch(gs, resolve_preset("dapo", {"overlong_filtering": filtering}))
        b.old_logprobs = actor.compute_logprobs(b)[0].detach() * b.response_mask
        return b

    def grads(b, ls):
        actor.train_step(b, ls, apply_update=False)
        return {n: t.clone() for n, t in actor.iter_full_grads()}

    def max_diff(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    rep = {}
    ls = LossSettings()
    trunc_a = {(p, 1): rnd(6) for p in range(2)}
    trunc_b = {(p, 1): rnd(6) for p in range(2)}
    torch.manual_seed(0)
    ga = groups(trunc_a)
    torch.manual_seed(0)
    g2 = torch.Generator().manual_seed(3)
    g = g2
    gb = groups(trunc_b)
    # same non-truncated responses in both (same generator sequence), other truncated ones
    for x, y in zip(ga, gb):
        y.prompt_ids = list(x.prompt_ids)
        y.responses = [r if j == 1 else list(x.responses[j]) for j, r in enumerate(y.responses)]
    ba, bb = batch_of(ga, True), batch_of(gb, True)
    rows_trunc = [i for i in range(ba.response_mask.shape[0]) if i % 4 == 1]
    rep["mask_rows_truncated"] = [float(ba.response_mask[i].sum()) for i in rows_trunc]
    rep["mask_rows_kept"] = [float(ba.response_mask[i].sum()) for i in range(ba.response_mask.shape[0])
                             if i % 4 != 1]
    rep["truncated_differ"] = any(x.responses[1] != y.responses[1] for x, y in zip(ga, gb))
    fa, fb = grads(ba, ls), grads(bb, ls)
    rep["filtered_grad_diff"] = max_diff(fa, fb)
    rep["filtered_grad_norm"] = math.sqrt(sum(float((t * t).sum()) for t in fa.values()))
    ua, ub = grads(batch_of(ga, False), ls), grads(batch_of(gb, False), ls)
    rep["unfiltered_grad_diff"] = max_diff(ua, ub)

    # TIS cap
    cap = 2.0
    b = batch_of(ga, False)
    w = torch.tensor([0.5, 1.5, 3.0, 5.0, 1.0, 2.5, 0.8, 4.0])
    b.rollout_logprobs = (b.old_logprobs - torch.log(w).unsqueeze(1)) * b.response_mask
    with_tis = grads(b, LossSettings(correction=RolloutCorrection(tis_cap=cap)))
    scaled = batch_of(ga, False)
    scaled.advantages = b.advantages * w.clamp(max=cap).unsqueeze(1)
    expect = grads(scaled, ls)
    uncapped = batch_of(ga, False)
    uncapped.advantages = b.advantages * w.unsqueeze(1)
    rep["tis_vs_scaled"] = max_diff(with_tis, expect)
    rep["tis_vs_uncapped"] = max_diff(with_tis, grads(uncapped, ls))
    rep["tis_vs_none"] = max_diff(with_tis, grads(batch_of(ga, False), ls))
    rep["grad_scale"] = max(float(t.abs().max()) for t in with_tis.values())

    # off-policy corrections through LossSettings: zero staleness changes nothing, bit for bit ...
    every = LossSettings(correction=RolloutCorrection(tis_cap=2.0, seq_is_mask_low=0.999, seq_is_mask_high=1.001,
                                                      icepop_low=0.5, icepop_high=5.0))
    fresh = batch_of(ga, False)
    fresh.rollout_logprobs = fresh.old_logprobs.clone()
    rep["zero_staleness_grad_diff"] = max_diff(grads(fresh, every), grads(batch_of(ga, False), ls))
    # ... and a row whose (constant) ratio w is outside [0.7, 2.8] (no ratio on a bound) is dropped by either
    # rule: the gradient is the plain one with that row's advantages zeroed, and the kept rows' scaled by the
    # rule's weight: 1 for the sequence mask, w for IcePop (its M(k) = k in the band), min(w, cap) with TIS
    keep = ((w >= 0.7) & (w <= 2.8)).to(torch.float32)
    for name, settings, scale in (
            ("seq", LossSettings(correction=RolloutCorrection(seq_is_mask_low=0.7, seq_is_mask_high=2.8)), keep),
            ("icepop", LossSettings(correction=RolloutCorrection(icepop_low=0.7, icepop_high=2.8)), keep * w),
            ("icepop_tis", LossSettings(correction=RolloutCorrection(tis_cap=cap, icepop_low=0.7, icepop_high=2.8)),
             keep * w.clamp(max=cap))):
        m = actor.train_step(b, settings, apply_update=False)
        got = {n: t.clone() for n, t in actor.iter_full_grads()}
        expect_b = batch_of(ga, False)
        expect_b.advantages = b.advantages * scale.unsqueeze(1)
        rep[f"{name}_vs_scaled"] = max_diff(got, grads(expect_b, ls))
        rep[f"{name}_masked_frac"] = m["seq_is_masked_frac" if name == "seq" else "icepop_masked_frac"]
    rows_tokens = b.response_mask.sum(1)
    rep["expected_masked_frac"] = float((rows_tokens * (1 - keep)).sum() / rows_tokens.sum())
    actor.close()
    Path(os.environ["OUT"]).write_text(json.dumps(rep, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
