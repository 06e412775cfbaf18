"""TF32 switch of the LM-head logprob GEMMs (megatron_dapo.actor.logprobs.tf32_matmuls / tf32=...)."""
from types import SimpleNamespace

import pytest
import torch

from megatron_dapo.actor import logprobs as L


def _flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()


@pytest.mark.parametrize("prec", ["highest", "high", "medium"])
def test_context_manager_restores_flags(prec):
    before = _flags()
    try:
        torch.set_float32_matmul_precision(prec)
        start = _flags()
        with L.tf32_matmuls(True):
            assert torch.backends.cuda.matmul.allow_tf32 is True
            with L.tf32_matmuls(True):          # re-entrant
                assert torch.backends.cuda.matmul.allow_tf32 is True
            assert torch.backends.cuda.matmul.allow_tf32 is True
        assert _flags() == start
        with pytest.raises(RuntimeError):
            with L.tf32_matmuls(True):
                raise RuntimeError("boom")
        assert _flags() == start
        with L.tf32_matmuls(False):
            assert _flags() == start
    finally:
        torch.set_float32_matmul_precision(before[1])
        torch.backends.cuda.matmul.allow_tf32 = before[0]


def test_use_tf32_only_for_16bit_cuda_operands():
    def t(dtype, cuda=True):
        return SimpleNamespace(dtype=dtype, is_cuda=cuda)
    bf, hf, f32 = torch.bfloat16, torch.float16, torch.float32
    assert L._use_tf32(True, t(bf), t(bf)) and L._use_tf32(True, t(hf), t(hf))
    assert not L._use_tf32(False, t(bf), t(bf))
    assert not L._use_tf32(True, t(f32), t(bf)) and not L._use_tf32(True, t(bf), t(f32))
    assert not L._use_tf32(True, t(f32), t(f32))
    assert not L._use_tf32(True, t(bf, cuda=False), t(bf, cuda=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_and_fp32_paths_never_enable_tf32(monkeypatch, dtype):
    seen = []
    real = L.tf32_matmuls

    def spy(enabled=True):
        seen.append(enabled)
        return real(enabled)

    monkeypatch.setattr(L, "tf32_matmuls", spy)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 8, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(50, 8, generator=g).to(dtype).requires_grad_(True)
    tgt = torch.randint(0, 50, (10,), generator=g)
    lp, ent = L.vocab_parallel_logprobs_entropy(h, w, tgt, chunk_size=4, tf32=True)
    (lp.sum() + ent.sum()).backward()
    assert seen and not any(seen)          # forward, recompute and backward GEMMs all ran without TF32
    lp2, ent2 = L.vocab_parallel_logprobs_entropy(h.detach(), w.detach(), tgt, chunk_size=4, tf32=False)
    assert torch.equal(lp.detach(), lp2) and torch.equal(ent.detach(), ent2)


def test_config_switch_validated(tmp_path):
    from megatron_dapo.config import ConfigError, DAPOConfig

    cfg = DAPOConfig()
    cfg.model.hf_path = str(tmp_path / "m")
    cfg.model.make_tiny = True
    assert cfg.actor.logprob_tf32 is True
    cfg.actor.logprob_tf32 = False
    cfg.validate()
    cfg.actor.logprob_tf32 = "no"
    with pytest.raises(ConfigError, match=r"actor\.logprob_tf32"):
        cfg.validate()
