"""Chunked vocab-parallel log-probs/entropy (megatron_dapo.actor.logprobs) vs the naive full-logits
computation: values and gradients (w.r.t. hidden states and output weight) ≤ 1e-6, including padded
vocabulary rows (excluded from the softmax, zero gradient), temperature, chunk sizes that do not divide
the length, and TP=2 over gloo. Also the actor's configuration errors on CPU (ConfigError)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megatron_dapo.actor.logprobs import naive_logprobs_entropy, vocab_parallel_logprobs_entropy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_scripts.common import torchrun  # noqa: E402


def _case(n=29, h=12, v_true=90, v_pad=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v_pad, h, generator=g) * 0.5
    weight[v_true:] = torch.randn(v_pad - v_true, h, generator=g) * 5
    targets = torch.randint(0, v_true, (n,), generator=g)
    return hidden, weight, targets, torch.randn(n, generator=g), torch.randn(n, generator=g)


def _grads(fn, hidden, weight, w_lp, w_ent):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp, ent = fn(h, w)
    (lp * w_lp + ent * w_ent).sum().backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_naive_with_padding(chunk, temperature):
    hidden, weight, targets, w_lp, w_ent = _case()
    v_true = 90
    lp, ent, gh, gw = _grads(lambda h, w: vocab_parallel_logprobs_entropy(
        h, w, targets, true_vocab_size=v_true, temperature=temperature, chunk_size=chunk), hidden, weight, w_lp, w_ent)
    lp_r, ent_r, gh_r, gw_r = _grads(lambda h, w: naive_logprobs_entropy(h @ w[:v_true].t(), targets, temperature),
                                     hidden, weight, w_lp, w_ent)
    assert (lp - lp_r).abs().max() <= 1e-6 * max(1.0, float(lp_r.abs().max()))
    assert (ent - ent_r).abs().max() <= 1e-6 * max(1.0, float(ent_r.abs().max()))
    assert (gh - gh_r).abs().max() <= 1e-6 * max(1.0, float(gh_r.abs().max()))
    assert (gw - gw_r).abs().max() <= 1e-6 * max(1.0, float(gw_r.abs().max()))
    assert gw[v_true:].abs().max() == 0  # padded rows get no gradient
    assert gw_r[:v_true].abs().max() > 0


def test_padding_rows_change_nothing():
    hidden, weight, targets, _, _ = _case()
    lp1, ent1 = vocab_parallel_logprobs_entropy(hidden, weight, targets, true_vocab_size=90, chunk_size=8)
    w2 = weight.clone()
    w2[90:] = 100.0
    lp2, ent2 = vocab_parallel_logprobs_entropy(hidden, w2, targets, true_vocab_size=90, chunk_size=8)
    assert torch.equal(lp1, lp2) and torch.equal(ent1, ent2)
    lp_all, _ = vocab_parallel_logprobs_entropy(hidden, w2, targets, chunk_size=8)  # no padding declared
    assert (lp_all - lp1).abs().max() > 1.0


def test_bad_inputs():
    hidden, weight, targets, _, _ = _case()
    with pytest.raises(ValueError, match="must be"):
        vocab_parallel_logprobs_entropy(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_logprobs_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs_entropy(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_logprobs_entropy(hidden, weight, targets, chunk_size=0)


@pytest.mark.slow
def test_tp2_gloo_matches_naive(tmp_path):
    out = tmp_path / "tp2.pt"
    torchrun("logprob_tp_worker.py", 2, {"OUT": str(out)})
    r = torch.load(out, weights_only=False)
    for a, b in (("lp", "lp_ref"), ("ent", "ent_ref")):
        assert (r[a] - r[b]).abs().max() <= 1e-6 * max(1.0, float(r[b].abs().max())), a
    # gradients: the TP all-reduce sums two fp32 partial products (another summation order than the
    # naive matmul), so compare with the relative Frobenius error
    gw = r["grad_w"]
    for g, g_ref in ((r["grad_h"], r["grad_h_ref"]), (gw[: r["v_true"]], r["grad_w_ref"])):
        assert float((g - g_ref).norm() / g_ref.norm()) <= 1e-6
    assert gw[r["v_true"]:].abs().max() == 0


def _gpu_with_te() -> bool:
    from megatron_dapo.backend import has_cuda, has_transformer_engine

    return has_cuda() and has_transformer_engine()


@pytest.mark.skipif(_gpu_with_te(), reason="GPU only: with Transformer Engine these features are allowed")
@pytest.mark.parametrize("override,key", [
    ("actor.context_parallel_size=2", "actor.context_parallel_size"),
    ("actor.fp8=e4m3", "actor.fp8"),
])
def test_gpu_only_features_rejected_on_cpu(tmp_path, override, key):
    from megatron_dapo.config import ConfigError, DAPOConfig

    cfg = DAPOConfig()
    cfg.model.hf_path = str(tmp_path / "m")
    cfg.model.make_tiny = True
    cfg.actor.tensor_model_parallel_size = 2
    k, v = override.split("=")
    field = k.split(".")[1]
    setattr(cfg.actor, field, {"true": True}.get(v, int(v) if v.isdigit() else v))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate()


def test_sequence_parallel_allowed_on_cpu(tmp_path):
    """Sequence parallelism runs on the local layer spec (cpu_shims 6); it still needs TP > 1."""
    from megatron_dapo.config import ConfigError, DAPOConfig

    cfg = DAPOConfig()
    cfg.model.hf_path = str(tmp_path / "m")
    cfg.model.make_tiny = True
    cfg.actor.sequence_parallel = True
    cfg.actor.tensor_model_parallel_size = 2
    cfg.validate(world_size=2)
    cfg.actor.tensor_model_parallel_size = 1
    with pytest.raises(ConfigError, match=r"actor\.sequence_parallel"):
        cfg.validate(world_size=2)
