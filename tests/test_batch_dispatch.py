"""The pure train-batch builder (algorithm/train_batch.py) and the per-DP-rank batch dispatch
(actor/dispatch.py): hand-computed rows, shards that reassemble to the full batch, ~1/DP bytes per rank,
and (torchrun, DP=2 on gloo) the sharded actor path giving the full path's gradients."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from megatron_dapo.actor.batching import FlatBatch, balance_across_ranks
from megatron_dapo.actor.dispatch import _pack, _unpack, plan_step, shard_for
from megatron_dapo.algorithm import (Group, MissingRolloutLogprobsError, RolloutCorrection, build_train_batch,
                                    flatten_groups, logprob_mismatch_parts, resolve_preset)
from megatron_dapo.sync.metrics import rollout_logprob_mismatch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_scripts.common import make_models, torchrun  # noqa: E402


def _group(idx, prompt, responses, rewards, reasons=None, rollout=None):
    return Group(prompt_index=idx, prompt_ids=prompt, responses=responses, rewards=rewards,
                 correct=[r > 0 for r in rewards], finish_reasons=reasons or ["stop"] * len(responses),
                 rollout_logprobs=rollout)


def _groups():
    return [
        _group(0, [5, 6], [[7, 8, 9], [10], [11, 12], [13, 14, 15, 16]], [1.0, -1.0, 1.0, -1.0],
               reasons=["stop", "stop", "length", "stop"],
               rollout=[[-0.1, -0.2, -0.3], [-0.4], [-0.5, -0.6], [-0.7, -0.8, -0.9, -1.0]]),
        _group(1, [20, 21, 22], [[23], [], [24, 25], [26]], [1.0, 1.0, 1.0, -1.0],
               rollout=[[-1.1], [], [-1.2, -1.3], [-1.4]]),
    ]


def test_advantages_are_eq9_per_group_and_broadcast_per_token():
    sw = resolve_preset("dapo", {})  # norm_adv_by_std, no overlong filtering
    b = build_train_batch(_groups(), sw)
    s = math.sqrt(4.0 / 3.0)  # Bessel std of [1, -1, 1, -1] (mean 0)
    g0 = [1 / (s + 1e-6), -1 / (s + 1e-6), 1 / (s + 1e-6), -1 / (s + 1e-6)]
    s1 = math.sqrt((3 * 0.25 + 2.25) / 3)  # [1, 1, 1, -1]: mean 0.5
    g1 = [0.5 / (s1 + 1e-6)] * 3 + [-1.5 / (s1 + 1e-6)]
    for i, a in enumerate(g0 + g1):
        on = b.response_mask[i] > 0
        if on.any():
            assert torch.allclose(b.advantages[i][on], torch.full((int(on.sum()),), a), atol=1e-6), i
        assert (b.advantages[i][~on] == 0).all()
    flat = flatten_groups(_groups(), resolve_preset("dapo", {"norm_adv_by_std": False}))  # Dr. GRPO
    assert flat.advantages.tolist() == [1.0, -1.0, 1.0, -1.0, 0.5, 0.5, 0.5, -1.5]


def test_rows_tokens_masks_and_rollout_logprobs_are_placed_on_the_response():
    b = build_train_batch(_groups(), resolve_preset("dapo", {}))
    assert b.input_ids.shape == (8, 6) and b.seq_lengths.tolist() == [5, 3, 4, 6, 4, 3, 5, 4]
    assert b.input_ids[3].tolist() == [5, 6, 13, 14, 15, 16]
    assert b.input_ids[6, :5].tolist() == [20, 21, 22, 24, 25]
    assert b.response_mask[0].tolist() == [0, 0, 1, 1, 1, 0]
    assert b.response_mask[6].tolist() == [0, 0, 0, 1, 1, 0]
    # the empty response (group 1, response 1) has no token in the loss
    assert b.response_mask[5].sum() == 0 and (b.advantages[5] == 0).all()
    assert torch.allclose(b.rollout_logprobs[0], torch.tensor([0, 0, -0.1, -0.2, -0.3, 0]))
    assert torch.allclose(b.rollout_logprobs[6], torch.tensor([0, 0, 0, -1.2, -1.3, 0]))
    # without overlong filtering the truncated response (group 0, response 2) trains
    assert b.response_mask[2].sum() == 2


def test_overlong_filtering_masks_truncated_responses_only():
    b = build_train_batch(_groups(), resolve_preset("dapo", {"overlong_filtering": True}))
    assert b.response_mask.sum(1).tolist() == [3, 1, 0, 4, 1, 0, 2, 1]
    assert (b.advantages[2] == 0).all()
    # the engine's log-probs stay where the tokens are (the mismatch metric ignores masked rows)
    assert torch.allclose(b.rollout_logprobs[2, 2:4], torch.tensor([-0.5, -0.6]))


def test_builder_without_rollout_logprobs_and_errors():
    gs = _groups()
    gs[1].rollout_logprobs = None
    assert build_train_batch(gs, resolve_preset("dapo", {})).rollout_logprobs is None
    with pytest.raises(ValueError, match="no groups"):
        flatten_groups([], resolve_preset("dapo", {}))
    with pytest.raises(ValueError, match="same number of responses"):
        flatten_groups([_groups()[0], _group(2, [1], [[2]], [1.0])], resolve_preset("dapo", {}))
    with pytest.raises(ValueError, match="empty prompt"):
        flatten_groups([_group(3, [], [[2], [3]], [1.0, 0.0])], resolve_preset("dapo", {}))


def test_a_group_without_engine_logprobs_is_refused_when_a_correction_needs_them():
    """Dropping rollout_logprobs for the whole batch would switch the behaviour correction off for the step
    (issue 22): with require_rollout_logprobs the group is named instead."""
    gs = _groups()
    gs[1].rollout_logprobs = None
    with pytest.raises(MissingRolloutLogprobsError,
                       match=r"group of prompt_index 1 \(1 of 2 groups\) has no engine log-probs"):
        flatten_groups(gs, resolve_preset("dapo", {}), require_rollout_logprobs=True)
    full = flatten_groups(_groups(), resolve_preset("dapo", {}), require_rollout_logprobs=True)
    assert full.rollout_logprobs is not None and full.rollout_logprobs.shape == full.tokens.shape


def test_offpolicy_prefix_mask_zeroes_the_tokens_of_older_versions():
    from megatron_dapo.algorithm.train_batch import offpolicy_prefix_mask

    # continued twice: 3 tokens by version 4, 2 by version 5, 1 by version 6 -> only the last span trains
    assert offpolicy_prefix_mask([[0, 3, 4], [3, 5, 5], [5, 6, 6]], 6) == [0, 0, 0, 0, 0, 1]
    # continued with no update in between: one version, nothing off-policy
    assert offpolicy_prefix_mask([[0, 2, 7], [2, 4, 7]], 4) == [1, 1, 1, 1]
    assert offpolicy_prefix_mask(None, 3) == [1, 1, 1] and offpolicy_prefix_mask([], 0) == []
    with pytest.raises(ValueError, match="covers 4 tokens of a 5-token response"):
        offpolicy_prefix_mask([[0, 4, 1]], 5)


def test_masked_prefix_leaves_the_loss_and_the_token_counts():
    """``mask_offpolicy_prefix`` (slime's ``--mask-offpolicy-in-partial-rollout``): the prefix stays in the row
    (context) but its mask, advantages and token count are 0; the continuation and other rows are unchanged."""
    sw = resolve_preset("dapo", {})
    gs = _groups()
    # group 0: response 0 continued (2 tokens by version 3, 1 by version 4); response 3 single-version; the rest
    # generated at version 4; group 1 without versions (e.g. from before partial rollout was switched on)
    gs[0].token_versions = [[[0, 2, 3], [2, 3, 4]], [[0, 1, 4]], [[0, 2, 4]], [[0, 4, 4]]]
    plain = flatten_groups(gs, sw)
    masked = flatten_groups(gs, sw, mask_offpolicy_prefix=True)
    assert plain.token_mask is None and flatten_groups(_groups(), sw, mask_offpolicy_prefix=True).token_mask is None
    assert torch.equal(masked.tokens, plain.tokens) and torch.equal(masked.advantages, plain.advantages)
    # row 0 = prompt [5, 6] + response [7, 8, 9]: the first 2 response tokens leave the loss
    assert masked.token_mask[:5].tolist() == [0, 0, 0, 0, 1]
    assert masked.loss_token_counts().tolist() == [1] + plain.loss_token_counts().tolist()[1:]
    a, b = plain.to_actor_batch(), masked.to_actor_batch()
    assert a.response_mask[0].tolist()[:5] == [0, 0, 1, 1, 1] and b.response_mask[0].tolist()[:5] == [0, 0, 0, 0, 1]
    assert torch.equal(a.response_mask[1:], b.response_mask[1:]) and torch.equal(a.advantages[1:], b.advantages[1:])
    assert b.advantages[0, :4].abs().sum() == 0 and b.advantages[0, 4] == a.advantages[0, 4]
    # selection and the wire format keep the mask with its rows
    sel = masked.select([1, 0])
    assert sel.token_mask[-5:].tolist() == [0, 0, 0, 0, 1] and sel.loss_token_counts().tolist()[1] == 1
    plan = plan_step(masked, mini_batch_size=8, ppo_epochs=1, dp_size=1, generator=torch.Generator().manual_seed(0))
    assert plan.updates[0][0].num_tokens == int(masked.loss_token_counts().sum()) == int(b.response_mask.sum())
    back = _unpack(*_pack(shard_for(masked, plan, 0))).batch
    sent = masked.select(plan.rank_rows[0]).to_actor_batch()
    assert torch.equal(back.to_actor_batch().response_mask, sent.response_mask)


def test_mismatch_parts_combine_to_the_metric():
    b = build_train_batch(_groups(), resolve_preset("dapo", {"overlong_filtering": True}))
    old = b.rollout_logprobs + 0.01 * torch.arange(b.input_ids.numel()).reshape(b.input_ids.shape) * b.response_mask
    whole = rollout_logprob_mismatch(old, b.rollout_logprobs, b.response_mask)
    a = logprob_mismatch_parts(old[:3], b.rollout_logprobs[:3], b.response_mask[:3])
    c = logprob_mismatch_parts(old[3:], b.rollout_logprobs[3:], b.response_mask[3:])
    assert (a[0] + c[0]) / (a[1] + c[1]) == pytest.approx(whole["rollout/train_rollout_logprob_abs_diff"], rel=1e-12)
    assert max(a[2], c[2]) == pytest.approx(whole["rollout/train_rollout_logprob_abs_diff_max"])


def _random_flat(n, seed=0, max_len=50, token_mask=False):
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(1, 8, (n,), generator=g)
    rlen = torch.randint(0, max_len, (n,), generator=g)
    offsets = torch.zeros(n + 1, dtype=torch.long)
    torch.cumsum(plen + rlen, 0, out=offsets[1:])
    t = int(offsets[-1])
    f = FlatBatch(tokens=torch.randint(0, 1000, (t,), generator=g), offsets=offsets, prompt_lengths=plen,
                  advantages=torch.randn(n, generator=g), loss_weights=(torch.rand(n, generator=g) > 0.2).float(),
                  rollout_logprobs=-torch.rand(t, generator=g))
    if token_mask:  # each response's first tokens (a random count) masked, as an off-policy prefix
        row_of = torch.repeat_interleave(torch.arange(n), plen + rlen)
        col = torch.arange(t) - offsets[:-1][row_of]
        cut = plen + torch.randint(0, max_len, (n,), generator=g)
        f.token_mask = (col >= cut[row_of]).float()
    return f


def test_flat_to_actor_batch_matches_the_row_builder():
    from megatron_dapo.actor.batching import build_actor_batch

    f = _random_flat(9)
    b = f.to_actor_batch()
    rows = [f.tokens[f.offsets[i]: f.offsets[i + 1]].tolist() for i in range(9)]
    ref = build_actor_batch([r[: int(p)] for r, p in zip(rows, f.prompt_lengths)],
                            [r[int(p):] for r, p in zip(rows, f.prompt_lengths)], loss_mask=f.loss_weights.tolist())
    assert torch.equal(b.input_ids, ref.input_ids) and torch.equal(b.response_mask, ref.response_mask)
    assert torch.equal(b.advantages, f.advantages[:, None] * ref.response_mask)
    sel = f.select([4, 1])
    assert sel.tokens.tolist() == rows[4] + rows[1] and sel.offsets.tolist() == [0, len(rows[4]), len(rows[4]) + len(rows[1])]


@pytest.mark.parametrize("masked", [False, True], ids=["all_tokens", "masked_prefixes"])
@pytest.mark.parametrize("epochs", [1, 2])
def test_plan_shards_reassemble_to_the_full_batch(epochs, masked):
    f, dp, mb = _random_flat(24, seed=1, token_mask=masked), 4, 8
    plan = plan_step(f, mini_batch_size=mb, ppo_epochs=epochs, dp_size=dp, generator=torch.Generator().manual_seed(3))
    shards = [shard_for(f, plan, d) for d in range(dp)]
    # each mini-batch is the actor's own split: same permutation, balance_across_ranks, same local order
    gen = torch.Generator().manual_seed(3)
    lengths, tok = f.lengths.tolist(), f.loss_token_counts().tolist()
    k = 0
    for _ in range(epochs):
        perm = torch.randperm(len(f), generator=gen).tolist()
        for s in range(0, len(f), mb):
            rows = perm[s: s + mb]
            split = balance_across_ranks([lengths[i] for i in rows], dp)
            for d in range(dp):
                upd = plan.updates[k][d]
                assert [plan.rank_rows[d][j] for j in upd.rows] == [rows[j] for j in split[d]]
                assert upd.num_tokens == sum(tok[i] for i in rows)
                assert upd.num_seqs == sum(1 for i in rows if tok[i] > 0)
            k += 1
    assert k == len(plan.updates)
    # the owned rows of all shards are every row exactly once, with the full batch's content
    owned = sorted(g for d in range(dp) for g, o in zip(plan.rank_rows[d], shards[d].owned.tolist()) if o)
    assert owned == list(range(len(f)))
    full = f.to_actor_batch()
    for d, sh in enumerate(shards):
        local = sh.batch.to_actor_batch()
        ref = full.select(plan.rank_rows[d])
        for name in ("input_ids", "response_mask", "advantages", "rollout_logprobs"):
            assert torch.equal(getattr(local, name), getattr(ref, name)), name
        # the wire format round-trips
        back = _unpack(*_pack(sh))
        assert back.updates == sh.updates and torch.equal(back.owned, sh.owned)
        assert torch.equal(back.batch.tokens, sh.batch.tokens) and torch.equal(back.batch.rollout_logprobs,
                                                                               sh.batch.rollout_logprobs)
        assert (back.batch.token_mask is None) == (not masked)
        if masked:
            assert torch.equal(back.batch.token_mask, sh.batch.token_mask)
    if epochs == 1:  # one epoch: each rank holds about 1/DP of the tokens
        for sh in shards:
            assert sh.batch.nbytes() < 0.35 * f.nbytes()
        assert sum(len(r) for r in plan.rank_rows) == len(f)


def test_plan_errors():
    f = _random_flat(6)
    with pytest.raises(ValueError, match="data-parallel"):
        plan_step(f, mini_batch_size=2, ppo_epochs=1, dp_size=4, generator=torch.Generator())
    with pytest.raises(ValueError, match="ppo_epochs"):
        plan_step(f, mini_batch_size=2, ppo_epochs=0, dp_size=1, generator=torch.Generator())


@pytest.mark.slow
def test_sharded_actor_path_equals_the_full_batch_path_at_dp2(tmp_path):
    models = make_models(tmp_path / "models")
    out = tmp_path / "report.json"
    torchrun("dispatch_worker.py", 2, {"HF": str(models["qwen2"]), "OUT": str(out)})
    r = json.loads(out.read_text())
    assert r["same_shard"] and r["adv_same"] and r["local_without_counts_raises"]
    assert r["masked_prefix_tokens"] == 8  # 2 continued samples x 2 groups x a 2-token prefix, out of the loss
    assert r["lp_diff"] <= 1e-5  # the same rows' log-probs in other micro-batches
    assert r["rows_per_rank"] < r["n_rows"]  # a rank does not hold the whole batch
    for mode in ("token-mean", "seq-mean-token-mean"):
        assert r[mode]["updates"] == 6 and r[mode]["ref_grad_norm"] > 1e-3
        assert r[mode]["grad_rel"] <= 1e-6 and r[mode]["metric_diff"] <= 1e-6, (mode, r[mode])


def test_trainer_dispatch_single_process_and_error_on_every_rank():
    from types import SimpleNamespace

    from megatron_dapo.actor.dispatch import Dispatcher
    from megatron_dapo.algorithm import NonFiniteAdvantageError
    from megatron_dapo.config import DAPOConfig
    from megatron_dapo.trainer import Trainer

    cfg = DAPOConfig()
    cfg.actor.ppo_mini_batch_size = 4
    fake = SimpleNamespace(rank=0, alg=resolve_preset("dapo", {}), cfg=cfg, step=3, dispatcher=Dispatcher(0, 1),
                           loss=SimpleNamespace(correction=None))
    shard = Trainer._dispatch(fake, *Trainer._advantages(fake, _groups()))
    flat = flatten_groups(_groups(), fake.alg)
    plan = plan_step(flat, mini_batch_size=4, ppo_epochs=1, dp_size=1,
                     generator=torch.Generator().manual_seed(cfg.seed * 7919 + 3))
    assert shard.updates == shard_for(flat, plan, 0).updates and len(shard.updates) == 2
    assert torch.equal(shard.batch.tokens, flat.tokens)  # one DP rank: every row, in order
    bad = _groups()
    bad[1].rewards = [1.0, float("nan"), 0.0, 0.0]
    with pytest.raises(NonFiniteAdvantageError, match="group 1"):
        Trainer._advantages(fake, bad)
    lacking = _groups()
    lacking[0].rollout_logprobs = None
    Trainer._advantages(fake, lacking)  # no correction configured: the batch trains without them
    fake.loss = SimpleNamespace(correction=RolloutCorrection())  # what the config builds with every rule off
    Trainer._advantages(fake, lacking)
    fake.loss = SimpleNamespace(correction=RolloutCorrection(tis_cap=2.0))
    with pytest.raises(MissingRolloutLogprobsError, match="prompt_index 0"):
        Trainer._advantages(fake, lacking)
    # algorithm.mask_offpolicy_in_partial_rollout reaches the rows: the continued sample's prefix leaves the loss
    fake.loss = SimpleNamespace(correction=None)
    continued = _groups()
    continued[0].token_versions = [[[0, 2, 2], [2, 3, 3]], [[0, 1, 3]], [[0, 2, 3]], [[0, 4, 3]]]
    assert Trainer._advantages(fake, continued)[0].token_mask is None  # off by default
    cfg.algorithm.mask_offpolicy_in_partial_rollout = True
    flat, plan = Trainer._advantages(fake, continued)
    assert flat.token_mask[:5].tolist() == [0, 0, 0, 0, 1] and flat.loss_token_counts()[0] == 1
    assert sum(per_rank[0].num_tokens for per_rank in plan.updates) == int(flat.loss_token_counts().sum())
