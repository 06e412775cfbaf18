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
Exits with code 0 and a skip message when CUDA is not available. :func:`measure` is the same benchmark as a
function (also at tiny sizes on the CPU); benchmarks/gpu/run_all.sh calls it for its ``actor_step`` part.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def write_random_qwen2(out: Path, layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int,
                       dtype: str = "bf16", device: str = "cpu", tie: bool = True) -> None:
    """A random Qwen2-architecture HF checkpoint (safetensors + config.json) in ``out``.

    Weights ~ N(0, 0.02²) (norm weights 1), drawn from a seed-0 generator on ``device`` (``"cuda"`` draws a
    1.5B-parameter model in seconds) and saved as ``dtype`` (``"bf16"`` or ``"fp32"``).
    """
    import torch
    from safetensors.torch import save_file

    tdt = torch.bfloat16 if dtype == "bf16" else torch.float32

    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
           "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 32768,
           "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": tie, "hidden_act": "silu",
           "dtype": "bfloat16" if dtype == "bf16" else "float32", "use_sliding_window": False}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator(device=device).manual_seed(0)
    d = hidden // heads

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(tdt).cpu()

    def ones(n):
        return torch.ones(n, dtype=tdt)

    t = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": ones(hidden)}
    if not tie:
        t["lm_head.weight"] = rnd(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": ones(hidden), p + "post_attention_layernorm.weight": ones(hidden),
                  p + "self_attn.q_proj.weight": rnd(heads * d, hidden), p + "self_attn.q_proj.bias": rnd(heads * d),
                  p + "self_attn.k_proj.weight": rnd(kv * d, hidden), p + "self_attn.k_proj.bias": rnd(kv * d),
                  p + "self_attn.v_proj.weight": rnd(kv * d, hidden), p + "self_attn.v_proj.bias": rnd(kv * d),
                  p + "self_attn.o_proj.weight": rnd(hidden, heads * d),
                  p + "mlp.gate_proj.weight": rnd(ffn, hidden), p + "mlp.up_proj.weight": rnd(ffn, hidden),
                  p + "mlp.down_proj.weight": rnd(hidden, ffn)})
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})


def train_step_flops_per_token(spec, n_params: int, seq: int) -> float:
    """Model FLOPs per token of one train step (forward + backward), PaLM appendix B convention.

    ``6·N_nonembedding + 6·H·V + 6·L·s·d_attn``: the (tied) LM head matmul counts once, causal attention
    half of the ``12·L·s·d`` term (average context s/2).
    """
    emb = spec.vocab_size * spec.hidden_size
    attn_dim = spec.num_attention_heads * spec.head_dim
    return 6 * (n_params - emb) + 6 * emb + 6 * spec.num_layers * seq * attn_dim


def measure(*, seq: int = 4096, micro_batch: int = 1, steps: int = 5, warmup: int = 2, layers: int = 16,
            hidden: int = 2048, heads: int = 16, kv_heads: int = 2, ffn: int = 8192, vocab: int = 151936,
            recompute=None, peak_tflops: float = 989.0, n_seq=None, keep_actor: bool = False,
            **actor_cfg) -> dict:
    """Build the random model, run ``warmup`` + ``steps`` bf16 train steps and return the figures.

    Runs on CUDA when available, else on CPU (tiny sizes only: the dry run of benchmarks/gpu/run_all.sh).
    Returns a dict with ``device``, ``params``, ``seq``, ``tokens_per_step``, ``step_s`` (seconds per train
    step, mean of ``steps``), ``tokens_per_s``, ``tflops_per_s``, ``mfu`` (fraction of ``peak_tflops``),
    ``peak_mem_gib`` (``torch.cuda.max_memory_allocated``; 0 on CPU), ``loss_finite``; with ``keep_actor``
    also ``_actor`` (the live actor; the caller closes it). ``actor_cfg``: extra ``ActorConfig`` fields
    (e.g. ``logprob_tf32=False``).
    """
    import torch

    from megatron_dapo.actor.batching import build_actor_batch
    from megatron_dapo.actor.megatron_actor import LossSettings, MegatronActor
    from megatron_dapo.config import ActorConfig
    from megatron_dapo.models.hf_config import spec_from_hf_config

    cuda = torch.cuda.is_available()
    tmp = Path(tempfile.mkdtemp(prefix="bench_actor_"))
    write_random_qwen2(tmp, layers, hidden, heads, kv_heads, ffn, vocab, device="cuda" if cuda else "cpu")
    spec = spec_from_hf_config(tmp)
    n_params = spec.num_parameters()
    cfg = ActorConfig(params_dtype="bf16", lr=1e-6, lr_warmup_steps=0, recompute=recompute,
                      max_tokens_per_gpu=seq * micro_batch, micro_batch_size=micro_batch,
                      logprob_chunk_size=1024, **actor_cfg)
    actor = MegatronActor(tmp, cfg, total_train_steps=steps + warmup)
    g = torch.Generator().manual_seed(0)
    n_seq = n_seq or micro_batch * 4
    prompt = min(256, seq // 4)
    prompts = [torch.randint(0, spec.vocab_size, (prompt,), generator=g).tolist() for _ in range(n_seq)]
    resps = [torch.randint(0, spec.vocab_size, (seq - prompt,), generator=g).tolist() for _ in range(n_seq)]
    b = build_actor_batch(prompts, resps)
    b.old_logprobs = torch.full(b.input_ids.shape, -5.0) * b.response_mask
    b.advantages = torch.randn(n_seq, 1, generator=g).expand(b.input_ids.shape).contiguous() * b.response_mask
    ls = LossSettings()
    for _ in range(warmup):
        actor.train_step(b, ls)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    metrics = {}
    for _ in range(steps):
        metrics = actor.train_step(b, ls)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tokens = n_seq * seq
    flops_per_token = train_step_flops_per_token(spec, n_params, seq)
    tps = tokens / dt
    losses = [float(v) for k, v in metrics.items() if "loss" in k and isinstance(v, (int, float))]
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "params": n_params, "layers": layers,
           "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "ffn": ffn, "vocab": vocab, "seq": seq,
           "micro_batch": micro_batch, "tokens_per_step": tokens, "steps": steps, "step_s": round(dt, 4),
           "tokens_per_s": round(tps, 1), "tflops_per_s": round(tps * flops_per_token / 1e12, 2),
           "mfu": round(tps * flops_per_token / (peak_tflops * 1e12), 4), "peak_tflops": peak_tflops,
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else 0.0,
           "recompute": recompute, "loss_finite": all(v == v and abs(v) != float("inf") for v in losses)}
    if keep_actor:
        res["_actor"] = actor
    else:
        actor.close()
    return res


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

    res = measure(seq=a.seq, micro_batch=a.micro_batch, steps=a.steps, warmup=a.warmup, layers=a.layers,
                  hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, ffn=a.ffn, vocab=a.vocab,
                  recompute=a.recompute, peak_tflops=a.peak_tflops)
    print(json.dumps(res))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
