"""Issue 3 acceptance: the DAPO loss is exact across micro-batches and data parallelism in the Megatron actor.

One mini-batch with sequences of very different lengths; the accumulated gradient must be identical (relative
difference <= 1e-6) when split into 1, 2 or 4 micro-batches, with DP = 1 or DP = 2, and equal the gradient of a
plain-PyTorch reference (HF transformers model + ``compute_policy_loss`` on the whole batch), for ``token-mean``
(DAPO eq. 8) and ``seq-mean-token-mean`` (GRPO); and so for the token-mean loss with the behaviour-policy corrections
(TIS + IcePop + sequence mask) in both denominator modes (``algorithm.masked_tokens_in_denominator``: masked tokens
kept in, or dropped from, the token count), against ``compute_decoupled_policy_loss`` on the whole batch. The
trainer's own split (rows planned over DP ranks, the kept tokens counted per rank after the old-logprob pass and
summed) gives the whole mini-batch's count in both modes.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from helpers import repo_env

WORKER = REPO_ROOT / "tests" / "loss_scripts" / "grads_worker.py"
# TIS + IcePop + geometric sequence mask; the two denominator modes of algorithm.masked_tokens_in_denominator
_CORRECTION = dict(tis_cap=1.5, icepop_low=0.5, icepop_high=2.0, seq_is_mask_low=0.7, seq_is_mask_high=1.4)
CORRECTIONS = {"correction/keep": dict(_CORRECTION, masked_tokens_in_denominator=True),
               "correction/drop": dict(_CORRECTION, masked_tokens_in_denominator=False)}


def _make_batch(vocab: int):
    from megatron_dapo.actor.batching import build_actor_batch

    g = torch.Generator().manual_seed(7)
    p_lens = [3, 9, 5, 2, 7, 4, 6, 3]
    r_lens = [1, 40, 3, 25, 2, 60, 8, 15]  # very different lengths
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in p_lens]
    resps = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in r_lens]
    b = build_actor_batch(prompts, resps)
    b.old_logprobs = (-5.0 + 0.3 * torch.randn(b.input_ids.shape, generator=g)) * b.response_mask
    b.advantages = torch.randn(len(p_lens), 1, generator=g).expand_as(b.response_mask).contiguous() * b.response_mask
    # behaviour log-probs: k = pi_old / pi_rollout = exp(0.6 z), so the corrections mask some tokens and rows
    g_rollout = torch.Generator().manual_seed(11)
    b.rollout_logprobs = (b.old_logprobs - 0.6 * torch.randn(b.input_ids.shape, generator=g_rollout)) * b.response_mask
    return b


def _reference_grads(model_dir, batch, mode, correction=None):
    """Plain PyTorch: HF model, full-batch logprobs, compute_policy_loss (compute_decoupled_policy_loss with the
    :class:`RolloutCorrection` keyword arguments ``correction``), backward; grads in Megatron layout."""
    from transformers import AutoModelForCausalLM

    from megatron_dapo.algorithm import RolloutCorrection, compute_decoupled_policy_loss, compute_policy_loss
    from megatron_dapo.models import mapping
    from megatron_dapo.models.hf_config import spec_from_hf_config

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # HF's nn.Embedding(padding_idx=pad_token_id) blocks the gradient of the pad row; Megatron (and the plain
    # math of eq. 8) does not. Use the plain embedding so both sides compute the same function.
    hf.get_input_embeddings().padding_idx = None
    logits = hf(batch.input_ids).logits.float()
    lp = torch.zeros_like(batch.response_mask)
    lp[:, 1:] = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    if correction is None:
        loss, _ = compute_policy_loss(lp, batch.old_logprobs, batch.advantages, batch.response_mask,
                                      loss_agg_mode=mode)
    else:
        loss, _ = compute_decoupled_policy_loss(lp, batch.old_logprobs, batch.rollout_logprobs, batch.advantages,
                                                batch.response_mask, correction=RolloutCorrection(**correction),
                                                loss_agg_mode=mode)
    loss.backward()
    grads = {n: p.grad for n, p in hf.named_parameters()}
    spec = spec_from_hf_config(model_dir)
    pv = spec.padded_vocab_size(1)

    def get(name):
        if name not in grads:
            raise KeyError(name)
        return grads[name]

    return {n: mapping.hf_to_mcore(spec, n, get, pv) for n in mapping.mcore_names(spec)}


def _rel(a, b, vocab):
    if a.dim() == 2 and a.shape[0] != b.shape[0]:  # vocab-padded rows differ between layouts
        a, b = a[:vocab], b[:vocab]
    # norm-wise relative difference ||a - b|| / ||b|| (fp32 kernels of HF and Megatron differ in summation order)
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.slow
def test_gradient_exact_over_microbatches_and_dp(tmp_path):
    from megatron_dapo.actor.parallel import free_port
    from megatron_dapo.data import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "m", family="qwen2", num_layers=2, vocab_size=300)
    batch = _make_batch(300)
    bpath = tmp_path / "batch.pt"
    data = {k: getattr(batch, k) for k in ("input_ids", "seq_lengths", "response_mask", "old_logprobs", "advantages",
                                           "rollout_logprobs")}
    torch.save(dict(data, corrections=CORRECTIONS), bpath)
    outs = {}
    for dp in (1, 2):
        out = tmp_path / f"grads_dp{dp}.pt"
        cmd = [sys.executable, str(WORKER), str(model), str(bpath), str(out)]
        if dp == 2:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                   f"--master-port={free_port()}"] + cmd[1:]
        proc = subprocess.run(cmd, env=repo_env(), capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
        assert proc.returncode == 0, proc.stderr[-5000:]
        outs[dp] = torch.load(out)
    for mode in ("token-mean", "seq-mean-token-mean"):
        ref = _reference_grads(model, batch, mode)
        worst = 0.0
        for dp in (1, 2):
            for mbs in (8, 4, 2):  # 1, 2 and 4 micro-batches per DP=1 rank
                got = outs[dp][f"{mode}/mbs{mbs}"]
                assert set(got) == set(ref)
                for n in ref:
                    worst = max(worst, _rel(got[n], ref[n], 300))
        base = outs[1][f"{mode}/mbs8"]
        split = max(_rel(outs[dp][f"{mode}/mbs{m}"][n], base[n], 300)
                    for dp in (1, 2) for m in (8, 4, 2) for n in base)
        print(f"{mode}: worst relative gradient difference vs plain PyTorch = {worst:.2e}; "
              f"across 1/2/4 micro-batches x DP 1/2 = {split:.2e}")
        assert worst <= 1e-6, (mode, worst)
        assert split <= 1e-6, (mode, split)
    # the corrections, with masked tokens kept in / dropped from the denominator
    from megatron_dapo.algorithm import RolloutCorrection
    from megatron_dapo.algorithm import rollout_correction_keep_mask

    kept = rollout_correction_keep_mask(batch.old_logprobs, batch.rollout_logprobs, batch.response_mask,
                                        RolloutCorrection(**_CORRECTION))
    assert 0 < int(kept.sum()) < int(batch.response_mask.sum())  # some tokens are masked, not all
    for name, kw in CORRECTIONS.items():
        ref = _reference_grads(model, batch, "token-mean", kw)
        worst = max(_rel(outs[dp][f"{name}/mbs{m}"][n], ref[n], 300) for dp in (1, 2) for m in (8, 4, 2) for n in ref)
        print(f"{name}: worst relative gradient difference vs plain PyTorch over 1/2/4 micro-batches x DP 1/2 = "
              f"{worst:.2e}")
        assert worst <= 1e-6, (name, worst)
    # the two modes differ (by the factor N_all / N_kept on the policy term)
    keep, drop = outs[1]["correction/keep/mbs8"], outs[1]["correction/drop/mbs8"]
    assert max(_rel(drop[n], keep[n], 300) for n in keep) > 1e-3


def _flat_batch():
    """Ten rows of different lengths, one with its loss masked (``loss_weights`` 0), with engine log-probs."""
    from megatron_dapo.actor.batching import FlatBatch

    g = torch.Generator().manual_seed(5)
    p_lens = torch.tensor([3, 2, 5, 4, 2, 6, 3, 2, 4, 3])
    r_lens = torch.tensor([1, 12, 4, 30, 2, 7, 18, 3, 9, 5])
    lens = p_lens + r_lens
    offsets = torch.zeros(len(lens) + 1, dtype=torch.long)
    torch.cumsum(lens, 0, out=offsets[1:])
    n_tok = int(offsets[-1])
    weights = torch.ones(len(lens))
    weights[3] = 0.0
    return FlatBatch(tokens=torch.randint(0, 300, (n_tok,), generator=g), offsets=offsets, prompt_lengths=p_lens,
                     advantages=torch.randn(len(lens), generator=g), loss_weights=weights,
                     rollout_logprobs=-3.0 + torch.randn(n_tok, generator=g))


def _with_old_logprobs(actor_batch):
    """A row-intrinsic stand-in for the old-logprob pass: k = exp(0.9 sin(1.3 * token id)) in [0.41, 2.46]."""
    actor_batch.old_logprobs = (actor_batch.rollout_logprobs + 0.9 * torch.sin(1.3 * actor_batch.input_ids.float()))
    return actor_batch


@pytest.mark.parametrize("in_denominator", [True, False])
def test_trainer_denominator_is_the_whole_minibatch_count_over_dp_splits(in_denominator):
    """Trainer._kept_counts on every DP rank's shard (its all-reduce played by summing the vectors the ranks
    contribute): per update, every rank gets the whole mini-batch's (tokens, sequences with one) -- the plan's
    counts when masked tokens stay in the denominator, the tokens that no rule masks when they are dropped --
    whatever the DP size."""
    from types import SimpleNamespace

    from megatron_dapo.actor.dispatch import plan_step, shard_for
    from megatron_dapo.actor.megatron_actor import LossSettings
    from megatron_dapo.algorithm import RolloutCorrection
    from megatron_dapo.algorithm import rollout_correction_keep_mask
    from megatron_dapo.trainer import Trainer

    flat = _flat_batch()
    correction = RolloutCorrection(icepop_low=0.5, icepop_high=2.0, seq_is_mask_high=1.3,
                                   masked_tokens_in_denominator=in_denominator)
    whole = _with_old_logprobs(flat.to_actor_batch())
    kept_rows = rollout_correction_keep_mask(whole.old_logprobs, whole.rollout_logprobs, whole.response_mask,
                                             correction).sum(1)
    all_rows = whole.response_mask.sum(1)
    assert 0 < int(kept_rows.sum()) < int(all_rows.sum())
    per_row = all_rows if in_denominator else kept_rows
    for dp in (1, 2, 3):
        plan = plan_step(flat, mini_batch_size=5, ppo_epochs=2, dp_size=dp, generator=torch.Generator().manual_seed(1))
        shards = [shard_for(flat, plan, rank) for rank in range(dp)]
        batches = [_with_old_logprobs(sh.batch.to_actor_batch()) for sh in shards]
        contributed: list[torch.Tensor] = []

        def counts(rank, sum_over_rows):
            fake = SimpleNamespace(loss=LossSettings(correction=correction),
                                   dispatcher=SimpleNamespace(sum_over_rows=sum_over_rows))
            return Trainer._kept_counts(fake, batches[rank], shards[rank])

        for rank in range(dp):  # what each rank puts into the all-reduce
            counts(rank, lambda v: contributed.append(v) or v)
        assert len(contributed) == (0 if in_denominator else dp)  # one all-reduce per step, only when dropping
        for rank in range(dp):
            got = counts(rank, lambda v: torch.stack(contributed).sum(0))
            assert len(got) == 4  # 2 epochs x 2 mini-batches
            for k, (n_tok, n_seq) in enumerate(got):
                rows = [plan.rank_rows[d][i] for d in range(dp) for i in plan.updates[k][d].rows]
                assert sorted(rows) == sorted(set(rows)) and len(rows) == 5
                assert (n_tok, n_seq) == (int(per_row[rows].sum()), int((per_row[rows] > 0).sum())), (dp, rank, k)
                if in_denominator:
                    assert (n_tok, n_seq) == (plan.updates[k][rank].num_tokens, plan.updates[k][rank].num_seqs)
