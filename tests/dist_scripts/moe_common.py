"""A tiny random Qwen3-MoE checkpoint for the MoE tests (transformers' ``Qwen3MoeForCausalLM``, saved as a Hub
checkpoint: per-expert ``mlp.experts.<i>.{gate,up,down}_proj`` tensors, ``mlp.gate`` router)."""
from __future__ import annotations

from pathlib import Path

#: 3 layers: MoE, dense (``mlp_only_layers``), MoE; 4 experts, top-2, renormalised top-k probabilities.
TINY_MOE = dict(vocab_size=150, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                num_experts_per_tok=2, mlp_only_layers=[1], decoder_sparse_step=1, norm_topk_prob=True,
                max_position_embeddings=128, tie_word_embeddings=False, rope_theta=10000.0)


def make_tiny_qwen3_moe(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Write a random fp32 tiny Qwen3-MoE (:data:`TINY_MOE` updated with ``overrides``) to ``out_dir``.

    Every weight is drawn fresh (std 0.05; norms around 1; router std 0.5 so routing is decisive, far from
    top-k ties). Returns ``out_dir``.
    """
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**{**TINY_MOE, **overrides})
    g = torch.Generator().manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    return out_dir


#: The engine-probe variant: head size 32 (what vLLM's CPU attention accepts), the demo tokenizer's vocabulary, and
#: every layer MoE (``mlp_only_layers=[]``, as in the published Qwen3-MoE checkpoints: SGLang 0.5.23's ``qwen3_moe``
#: model builds every layer sparse and ignores ``mlp_only_layers``).
ENGINE_MOE = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
                  mlp_only_layers=[])


def make_engine_moe(out_dir: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A tiny Qwen3-MoE (:data:`TINY_MOE` with :data:`ENGINE_MOE`, then ``overrides``) that real engines can tokenize
    for: the tokenizer
    files of ``tokenizer_dir`` (a :func:`megatron_dapo.data.tiny_checkpoint.make_tiny_checkpoint` directory) are
    copied in and the vocabulary, bos / eos / pad ids follow that directory's ``config.json``. Returns ``out_dir``.

    Raises:
        FileNotFoundError: ``tokenizer_dir`` has no ``config.json``.
    """
    import json
    import shutil

    src = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    ids = {k: src[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if src.get(k) is not None}
    out = make_tiny_qwen3_moe(Path(out_dir), seed=seed, **{"vocab_size": src["vocab_size"], **ENGINE_MOE, **ids,
                                                           **overrides})
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")) or f.name == "generation_config.json":
            shutil.copy(f, out / f.name)
    return out
