"""GPU: TF32 tensor cores for the bf16 LM-head logprob/entropy GEMMs (``actor.logprob_tf32``) on vs off.

    python benchmarks/gpu/bench_logprob_tf32.py --out DIR            # on the GPU machine
    python benchmarks/gpu/bench_logprob_tf32.py --dry-run --out DIR  # tiny sizes on the CPU (checks the code)

(a) :func:`megatron_dapo.actor.logprobs.vocab_parallel_logprobs_entropy` forward + backward at T positions,
    hidden H, vocabulary V (default 8192 × 1536 × 151,936, bf16 hidden/weight, chunk 1024) with ``tf32`` on and
    off: mean seconds per fwd+bwd, the max abs difference of log-probs and entropy between the two, the
    relative difference of the gradients (``max|g_on − g_off| / max|g_off|`` and the Frobenius ratio), the
    error of each against an fp64 reference on the first chunk, and that the global TF32 flags are unchanged
    afterwards.
(b) a bf16 actor train step on the Qwen2.5-1.5B shape (hidden 1536, 12 heads / 2 KV, FFN 8960, vocab 151,936;
    ``--layers`` layers, default 8) via ``bench_actor.measure`` with ``logprob_tf32`` on and off: step time,
    tokens/s, MFU.

Writes ``logprob_tf32.json`` to ``--out``. Without CUDA (and without ``--dry-run``) it prints a skip message.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

QWEN25_15B = dict(hidden=1536, heads=12, kv_heads=2, ffn=8960, vocab=151936)
TINY = dict(hidden=64, heads=4, kv_heads=2, ffn=128, vocab=512)


def _fwd_bwd(h, w, tgt, g_lp, g_ent, chunk, tf32):
    from megatron_dapo.actor.logprobs import vocab_parallel_logprobs_entropy

    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs_entropy(h, w, tgt, chunk_size=chunk, tf32=tf32)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def logprob_part(T: int, H: int, V: int, chunk: int, iters: int, device: str) -> dict:
    import torch

    from megatron_dapo.actor.logprobs import naive_logprobs_entropy

    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(T, H, generator=g, device=device).to(torch.bfloat16)           # post-norm scale ~1
    w = (torch.randn(V, H, generator=g, device=device) * 0.02).to(torch.bfloat16)  # init scale of the model
    tgt = torch.randint(0, V, (T,), generator=g, device=device)
    g_lp = torch.randn(T, generator=g, device=device)
    g_ent = torch.randn(T, generator=g, device=device) * 0.1
    flags0 = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    out, res = {}, {"T": T, "H": H, "V": V, "chunk": chunk, "iters": iters, "flags_before": list(flags0)}
    cuda = device == "cuda"
    for tf32 in (False, True):
        out[tf32] = _fwd_bwd(h, w, tgt, g_lp, g_ent, chunk, tf32)   # warm-up (cuBLAS heuristics, allocator)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            out[tf32] = _fwd_bwd(h, w, tgt, g_lp, g_ent, chunk, tf32)
        if cuda:
            torch.cuda.synchronize()
        res[f"fwd_bwd_s_tf32_{'on' if tf32 else 'off'}"] = round((time.perf_counter() - t0) / iters, 4)
    res["speedup"] = round(res["fwd_bwd_s_tf32_off"] / res["fwd_bwd_s_tf32_on"], 2)
    (lp0, e0, gh0, gw0), (lp1, e1, gh1, gw1) = out[False], out[True]
    res["logp_max_abs_diff"] = float((lp1 - lp0).abs().max())
    res["entropy_max_abs_diff"] = float((e1 - e0).abs().max())
    for name, a, b in (("grad_hidden", gh1, gh0), ("grad_weight", gw1, gw0)):
        a, b = a.float(), b.float()
        res[f"{name}_max_diff_over_max"] = float((a - b).abs().max() / b.abs().max())
        res[f"{name}_rel_fro"] = float((a - b).norm() / b.norm())
        res[f"{name}_bitwise_equal_frac"] = float((a == b).float().mean())
    # fp64 reference on the first chunk: each mode's own error
    c = min(chunk, T)
    z64 = h[:c].double() @ w.double().t()
    lp_ref, e_ref = naive_logprobs_entropy(z64, tgt[:c])
    lp_ref, e_ref = lp_ref.double(), e_ref.double()
    for tf32, (lp, e, _, _) in out.items():
        k = "on" if tf32 else "off"
        res[f"logp_err_vs_fp64_tf32_{k}"] = float((lp[:c].double() - lp_ref).abs().max())
        res[f"entropy_err_vs_fp64_tf32_{k}"] = float((e[:c].double() - e_ref).abs().max())
    res["flags_after"] = [torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()]
    res["flags_restored"] = tuple(res["flags_after"]) == flags0
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="directory for logprob_tf32.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--H", type=int, default=1536)
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-step", action="store_true", help="only part (a)")
    a = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        print("SKIP: benchmarks/gpu/bench_logprob_tf32.py needs a CUDA GPU (use --dry-run on the CPU)")
        return 0
    device = "cuda" if cuda else "cpu"
    res = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "dry_run": a.dry_run,
           "torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    t0 = time.perf_counter()
    if a.dry_run:
        res["logprob"] = logprob_part(64, 32, 1000, 16, 1, device)
    else:
        res["logprob"] = logprob_part(a.T, a.H, a.V, a.chunk, a.iters, device)
    print(json.dumps(res["logprob"]), flush=True)
    if cuda:
        torch.cuda.empty_cache()
    if not a.skip_step:
        import bench_actor

        res["actor_step"] = {}
        for tf32 in (True, False):
            if a.dry_run:
                r = bench_actor.measure(seq=64, steps=1, warmup=1, layers=1, logprob_tf32=tf32, **TINY)
            else:
                r = bench_actor.measure(seq=a.seq, micro_batch=1, steps=a.steps, warmup=1, layers=a.layers,
                                        logprob_tf32=tf32, **QWEN25_15B)
            res["actor_step"]["on" if tf32 else "off"] = r
            print(f"logprob_tf32={tf32}: {json.dumps(r)}", flush=True)
            if cuda:
                torch.cuda.empty_cache()
        on, off = res["actor_step"]["on"], res["actor_step"]["off"]
        res["actor_step"]["speedup"] = round(off["step_s"] / on["step_s"], 3)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "logprob_tf32.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "actor_step"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
