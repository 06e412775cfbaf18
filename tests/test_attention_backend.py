"""``actor.attention_backend``: the ``sdpa`` core attention against megatron-core's local one.

* one torchrun launch of 2 processes (tests/dist_scripts/attention_worker.py) builds the actor with
  ``local`` and with ``sdpa`` at TP=2 (padded; sequence parallel + THD packed) and PP=2 (padded; THD packed):
  log-probs and the gradients of one DAPO loss step agree to <= 1e-6 (fp32, a GQA model);
* the module alone (single process): padded, THD-packed with filler, GQA, and the errors it raises;
* config validation and the ``auto`` resolution.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_scripts.common import torchrun  # noqa: E402

from megatron_dapo.config import ActorConfig, ConfigError  # noqa: E402

LAYOUTS = ["tp=2", "tp=2,sp=1,pack=1", "pp=2", "pp=2,pack=1"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from megatron_dapo.data.tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("attention")
    model = make_tiny_checkpoint(root / "qwen2", family="qwen2", num_layers=2, vocab_size=300)
    out = root / "res.pt"
    torchrun("attention_worker.py", 2, dict(HF_DIR=str(model), LAYOUTS=";".join(LAYOUTS), OUT=str(out)))
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sdpa_matches_local_logprobs_and_grads(results, layout):
    ref, got = results[layout]["local"], results[layout]["sdpa"]
    assert ref["core_attention"] == ["DotProductAttention"]
    assert got["core_attention"] == ["SDPAttention"] and got["sdpa_modules"] > 0
    assert got["sequence_parallel"] == ("sp=1" in layout)
    assert ref["mask"].sum() > 20
    assert (got["logprobs"] - ref["logprobs"]).abs().max() <= 1e-6
    assert set(got["grads"]) == set(ref["grads"])
    nonzero = 0
    for name, g_ref in ref["grads"].items():
        g = got["grads"][name]
        assert g.shape == g_ref.shape, name
        assert (g - g_ref).abs().max() <= 1e-6, (layout, name, float((g - g_ref).abs().max()))
        nonzero += int(g_ref.abs().max() > 0)
    assert nonzero >= len(ref["grads"]) - 1


# ------------------------------------------------------------------ the module alone (one process)
@pytest.fixture(scope="module")
def single_process():
    from megatron_dapo.cpu_shims import apply_cpu_shims

    apply_cpu_shims()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from dist_scripts.common import free_port

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1)
    yield
    ps.destroy_model_parallel()
    if own:
        dist.destroy_process_group()


def _modules(**over):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_dapo.actor.attention import SDPAttention

    kw = dict(num_layers=1, hidden_size=64, num_attention_heads=8, num_query_groups=2, attention_dropout=0.0)
    kw.update(over)
    cfg = TransformerConfig(**kw)
    return (SDPAttention(cfg, 1, AttnMaskType.causal, "self").eval(),
            DotProductAttention(cfg, 1, AttnMaskType.causal, "self").eval())


def _qkv(*lead):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*lead, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (8, 2, 2)]


def test_module_padded_and_packed_match_local(single_process):
    from megatron.core.packed_seq_params import PackedSeqParams

    sdpa, local = _modules()
    q, k, v = _qkv(7, 3)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1).view(1, 1, 7, 7)
    out = sdpa(q, k, v, causal)
    assert out.shape == (7, 3, 64)
    ref = local(q, k, v, causal)
    assert (out - ref).abs().max() <= 1e-12
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert max(float((a - b).abs().max()) for a, b in zip(grads, grads_ref)) <= 1e-12
    # THD: 3 sequences (3, 2, 4 tokens) padded to 4, 2, 5 -> filler at 3 and 10
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    cu_pad = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    p = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
                        cu_seqlens_kv_padded=cu_pad, max_seqlen_q=4, max_seqlen_kv=4)
    q, k, v = _qkv(11)
    out = sdpa(q, k, v, None, packed_seq_params=p)
    assert out.shape == (11, 64)
    assert (out - local(q, k, v, None, packed_seq_params=p)).abs().max() <= 1e-12
    assert out[3].abs().max() == 0 and out[10].abs().max() == 0 and out[9].abs().max() > 0
    # each segment alone gives the same values (no attention across documents)
    alone = sdpa(*(x[4:6].unsqueeze(1) for x in (q, k, v)), None)
    assert (out[4:6] - alone[:, 0]).abs().max() <= 1e-12


def test_module_dropout_and_errors(single_process):
    from megatron.core.packed_seq_params import PackedSeqParams

    sdpa, _ = _modules(attention_dropout=0.5)
    q, k, v = _qkv(6, 2)
    assert torch.equal(sdpa(q, k, v, None), sdpa(q, k, v, None))  # eval: no dropout
    sdpa.train()
    assert not torch.equal(sdpa(q, k, v, None), sdpa(q, k, v, None))
    sdpa.eval()
    with pytest.raises(ValueError, match="attention bias"):
        sdpa(q, k, v, None, attention_bias=torch.zeros(1))
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="qkv_format='thd' only"):
        sdpa(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu))
    with pytest.raises(ValueError, match="do not fit 6 packed tokens"):
        sdpa(*(x[:, 0] for x in (q, k, v)), None, packed_seq_params=PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu))


# ------------------------------------------------------------------ config and resolution
def test_config_validation(monkeypatch):
    import megatron_dapo.config as config

    assert ActorConfig().attention_backend == "auto"
    for backend in ("auto", "sdpa", "local"):
        ActorConfig(attention_backend=backend).validate()
    with pytest.raises(ConfigError, match=r"^actor\.attention_backend: must be one of auto, te, sdpa, local"):
        ActorConfig(attention_backend="flash").validate()
    monkeypatch.setattr(config, "has_transformer_engine", lambda: False)
    with pytest.raises(ConfigError) as e:
        ActorConfig(attention_backend="te").validate()
    assert str(e.value) == "actor.attention_backend: te: Transformer Engine is not importable"
    ActorConfig(attention_backend="te").validate(local=False)  # a cluster dry run does not import TE here
    with pytest.raises(ConfigError, match=r"^actor\.attention_backend: sdpa does not support context_parallel"):
        ActorConfig(attention_backend="sdpa", context_parallel_size=2).validate(local=False)


def test_auto_resolution_and_spec(monkeypatch, single_process):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_dapo.actor import attention

    monkeypatch.setattr(attention, "has_transformer_engine", lambda: False)
    assert attention.resolve_attention_backend("auto") == "sdpa"
    with pytest.raises(ConfigError, match="Transformer Engine is not importable"):
        attention.resolve_attention_backend("te")
    with pytest.raises(ConfigError, match="must be one of"):
        attention.resolve_attention_backend("flash")
    monkeypatch.setattr(attention, "has_transformer_engine", lambda: True)
    assert attention.resolve_attention_backend("auto") == "te"
    assert attention.resolve_attention_backend("sdpa") == "sdpa"
    base = get_gpt_layer_local_spec(normalization="RMSNorm")
    sdpa = attention.apply_attention_backend(base, "sdpa")
    assert sdpa.submodules.self_attention.submodules.core_attention is attention.SDPAttention
    assert base.submodules.self_attention.submodules.core_attention is DotProductAttention  # not modified
    local = attention.apply_attention_backend(base, "local")
    assert local.submodules.self_attention.submodules.core_attention is DotProductAttention
    block = get_gpt_decoder_block_spec(TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=8),
                                       use_transformer_engine=False, normalization="RMSNorm")
    block = attention.apply_attention_backend(block, "sdpa")
    assert [s.submodules.self_attention.submodules.core_attention for s in block.layer_specs] == [
        attention.SDPAttention] * 2
    with pytest.raises(ValueError, match="has no self_attention.core_attention"):
        attention.apply_attention_backend(base.submodules.self_attention, "sdpa")

