"""GPU: bf16 training-step throughput of the Megatron actor on a ~1B-parameter Qwen2.5-shaped random model.

    python benchmarks/gpu/bench_actor.py [--seq 4096] [--micro-batch 1] [--steps 5] [--layers 16]

Builds a random HF-format Qwen2.5-shaped checkpoint (hidden 2048, 16 heads / 2 KV groups, FFN 8192,
vocab 151,936 tied; 16 layers ≈ 1.3 B parameters) in a temporary directory, runs
:class:`megatron_dapo.actor.megatron_actor.MegatronActor` (TP=PP=1, bf16 params, fp32 master weights,
local layer spec — Transformer Engine is used when installed) for ``--steps`` DAPO train steps on
random sequences of ``--seq`` tokens, and prints tokens/s and MFU.

MFU = model FLOPs/s ÷ peak. Model FLOPs per token of one train step (forward + backward = 3× forward):
``6·N_nonembedding + 6·H·V (LM head) + 6·L·s·d_attn`` (causal attention: half of the 12·L·s·d term), the
convention of the PaLM paper (Chowdhery et al. 2022, appendix B). Peak: H100/H200 SXM dense bf16
989 TFLOP/s (NVIDIA H100 datasheet); override with ``--peak-tflops``.
Exits with code 0 and a skip message when CUDA is not available.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def write_random_qwen2(out: Path, layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int) -> None:
    """A random Qwen2-architecture HF checkpoint (bf16 safetensors + config.json)."""
    import torch
    from safetensors.torch import save_file

    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
           "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 32768,
           "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
           "dtype": "bfloat16", "use_sliding_window": False}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    d = hidden // heads

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                  p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                  p + "self_attn.q_proj.weight": rnd(heads * d, hidden), p + "self_attn.q_proj.bias": rnd(heads * d),
                  p + "self_attn.k_proj.weight": rnd(kv * d, hidden), p + "self_attn.k_proj.bias": rnd(kv * d),
                  p + "self_attn.v_proj.weight": rnd(kv * d, hidden), p + "self_attn.v_proj.bias": rnd(kv * d),
                  p + "self_attn.o_proj.weight": rnd(hidden, heads * d),
                  p + "mlp.gate_proj.weight": rnd(ffn, hidden), p + "mlp.up_proj.weight": rnd(ffn, hidden),
                  p + "mlp.down_proj.weight": rnd(hidden, ffn)})
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--recompute", default=None, choices=[None, "full", "selective"])
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    a = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("SKIP: benchmarks/gpu/bench_actor.py needs a CUDA GPU (none available here)")
        return 0
    import torch.distributed as dist

    from megatron_dapo.actor.batching import build_actor_batch
    from megatron_dapo.actor.megatron_actor import LossSettings, MegatronActor
    from megatron_dapo.config import ActorConfig
    from megatron_dapo.models.hf_config import spec_from_hf_config

    tmp = Path(tempfile.mkdtemp(prefix="bench_actor_"))
    write_random_qwen2(tmp, a.layers, a.hidden, a.heads, a.kv_heads, a.ffn, a.vocab)
    spec = spec_from_hf_config(tmp)
    n_params = spec.num_parameters()
    cfg = ActorConfig(params_dtype="bf16", lr=1e-6, lr_warmup_steps=0, recompute=a.recompute,
                      max_tokens_per_gpu=a.seq * a.micro_batch, micro_batch_size=a.micro_batch,
                      logprob_chunk_size=1024)
    actor = MegatronActor(tmp, cfg, total_train_steps=a.steps + a.warmup)
    g = torch.Generator().manual_seed(0)
    n_seq = a.micro_batch * 4
    prompt = 256
    prompts = [torch.randint(0, spec.vocab_size, (prompt,), generator=g).tolist() for _ in range(n_seq)]
    resps = [torch.randint(0, spec.vocab_size, (a.seq - prompt,), generator=g).tolist() for _ in range(n_seq)]
    b = build_actor_batch(prompts, resps)
    b.old_logprobs = torch.full(b.input_ids.shape, -5.0) * b.response_mask
    b.advantages = torch.randn(n_seq, 1, generator=g).expand(b.input_ids.shape).contiguous() * b.response_mask
    ls = LossSettings()
    for _ in range(a.warmup):
        actor.train_step(b, ls)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        actor.train_step(b, ls)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    tokens = n_seq * a.seq
    emb = spec.vocab_size * spec.hidden_size
    attn_dim = spec.num_attention_heads * spec.head_dim
    # causal attention per token and layer, forward: QK^T and AV, 2 FLOP per MAC, s/2 average context
    # -> 2*s*d; a train step is 3x forward -> 6*s*d. Tied embedding: the LM head matmul is 6*H*V.
    flops_per_token = 6 * (n_params - emb) + 6 * emb + 6 * spec.num_layers * a.seq * attn_dim
    tps = tokens / dt
    mfu = tps * flops_per_token / (a.peak_tflops * 1e12)
    res = {"device": torch.cuda.get_device_name(), "params": n_params, "seq": a.seq, "tokens_per_step": tokens,
           "step_s": round(dt, 3), "tokens_per_s": round(tps, 1), "tflops_per_s": round(tps * flops_per_token / 1e12, 1),
           "mfu": round(mfu, 4), "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
           "recompute": a.recompute}
    print(json.dumps(res))
    actor.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
