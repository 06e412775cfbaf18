"""GPU: where the time of one actor bf16 train step goes (torch profiler), same actor as bench_actor.py.

    python benchmarks/gpu/profile_actor.py --out DIR [--layers 28] [--seq 4096] [--no-alloc-ab]
    python benchmarks/gpu/profile_actor.py --dry-run            # tiny model on the CPU (checks the code path)

Builds the Qwen2.5-1.5B-shaped random actor with :func:`bench_actor.measure` (default: all 28 layers, hidden
1536, 12 heads / 2 KV, FFN 8960, vocab 151,936 tied; 4 × 4096 tokens per step, local layer spec), runs its
2 warm-up steps and 1 timed step, then one more step under ``torch.profiler.profile(activities=[CPU, CUDA])``.
Prints and writes ``DIR/profile.json`` and ``DIR/profile.txt``: the top CUDA kernels by total time with their
share, the kernel time grouped by category (attention matmuls, softmax, masking, linear GEMMs, norms,
optimizer, log-softmax/entropy of the LM head, elementwise/cast, memory copies, NCCL, other), the GPU busy
share (union of kernel intervals ÷ wall time of the profiled step) and the step times.

Categories come from the CPU op that launched each kernel and its ancestors (forward op, or the autograd
node in backward, or ``Optimizer.step``), then from the kernel's name. With ``--alloc-ab`` (default on
CUDA) the step is also timed in two fresh processes (8 layers, 1 warm-up + 2 timed steps) with
``PYTORCH_CUDA_ALLOC_CONF`` unset vs ``expandable_segments:True`` when time allows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

QWEN25_15B = dict(hidden=1536, heads=12, kv_heads=2, ffn=8960, vocab=151936)
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=512)

CATEGORIES = ["attention matmul (bmm/baddbmm)", "attention softmax", "attention masking", "linear GEMM",
              "norm (RMSNorm)", "optimizer (Adam & master-weight copies)", "LM-head log-softmax/entropy",
              "elementwise/cast", "memory copy/set", "NCCL", "other"]


def classify(op: str, ancestors: str, kernel: str) -> str:
    """Category of one kernel from its launching op, the op's ancestors (joined names) and the kernel name."""
    k, o, a = kernel.lower(), op.lower(), ancestors.lower()
    if "nccl" in k:
        return "NCCL"
    if k.startswith("memcpy") or k.startswith("memset") or o in ("aten::copy_", "aten::fill_", "aten::zero_") \
            and ("memcpy" in k or "memset" in k):
        return "memory copy/set"
    if "optimizer" in a or "adam" in k or "adam" in a or "multi_tensor" in k:
        return "optimizer (Adam & master-weight copies)"
    if o in ("aten::bmm", "aten::baddbmm") or "bmmbackward" in a or "baddbmmbackward" in a:
        return "attention matmul (bmm/baddbmm)"
    if "log_softmax" in o or "logsoftmax" in a or "log_softmax" in a or "logsumexp" in a \
            or "entropy" in a or "cross_entropy" in a:
        return "LM-head log-softmax/entropy"
    if "softmax" in o or "softmax" in k or "softmaxbackward" in a:
        return "attention softmax"
    if "masked_fill" in o or "masked_fill" in a or "maskedfill" in a:
        return "attention masking"
    if o in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::_addmm_activation") \
            or "gemm" in k or "cutlass" in k or "nvjet" in k or "xmma" in k:
        return "linear GEMM"
    if "norm" in k or "rms_norm" in a or "layer_norm" in a or "rmsnorm" in a or "norm" in o:
        return "norm (RMSNorm)"
    if "memcpy" in k or "memset" in k:
        return "memory copy/set"
    if "elementwise" in k or "vectorized" in k or "copy" in k or "reduce" in k or "cast" in k \
            or o.startswith("aten::"):
        return "elementwise/cast"
    return "other"


def _ancestors(ev, depth: int = 12) -> str:
    names, p = [], getattr(ev, "cpu_parent", None)
    while p is not None and len(names) < depth:
        names.append(p.name)
        p = getattr(p, "cpu_parent", None)
    return " | ".join(names)


def analyse(prof, wall_s: float, cuda: bool, top: int = 20) -> dict:
    """Kernel table, categories and busy share from a finished ``torch.profiler.profile``.

    On the CPU (dry run) the leaf CPU ops stand in for kernels, so the same code path is exercised."""
    evs = prof.events()
    per_kernel: dict[str, list] = {}  # name -> [total_us, count]
    per_cat = {c: 0.0 for c in CATEGORIES}
    per_op: dict[str, float] = {}
    examples: dict[str, dict] = {c: {} for c in CATEGORIES}
    for ev in evs:
        if cuda:
            ks = [(k.name, float(k.duration)) for k in getattr(ev, "kernels", [])]
        else:
            ks = [(ev.name, float(ev.self_cpu_time_total))] if not ev.cpu_children and ev.self_cpu_time_total else []
        if not ks:
            continue
        anc = _ancestors(ev)
        for name, dur in ks:
            c = classify(ev.name, anc, name)
            per_cat[c] += dur
            per_op[ev.name] = per_op.get(ev.name, 0.0) + dur
            rec = per_kernel.setdefault(name, [0.0, 0, c])
            rec[0] += dur
            rec[1] += 1
            examples[c][ev.name] = examples[c].get(ev.name, 0.0) + dur
    if cuda and not per_kernel:  # no CPU-op ↔ kernel links: classify the device events by name alone
        from torch.autograd import DeviceType

        for ev in evs:
            if getattr(ev, "device_type", None) == DeviceType.CUDA:
                dur = float(ev.time_range.end - ev.time_range.start)
                c = classify("", "", ev.name)
                per_cat[c] += dur
                rec = per_kernel.setdefault(ev.name, [0.0, 0, c])
                rec[0] += dur
                rec[1] += 1
                examples[c][ev.name[:40]] = examples[c].get(ev.name[:40], 0.0) + dur
    total_us = sum(per_cat.values()) or 1.0
    # busy time: union of the device events' intervals
    busy_us = 0.0
    if cuda:
        from torch.autograd import DeviceType

        iv = sorted((e.time_range.start, e.time_range.end) for e in evs
                    if getattr(e, "device_type", None) == DeviceType.CUDA and e.time_range.end > e.time_range.start)
        cur_s = cur_e = None
        for s, e in iv:
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    busy_us += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            busy_us += cur_e - cur_s
    else:
        busy_us = total_us
    kern = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
    return {
        "kernel_time_ms": round(total_us / 1e3, 2),
        "busy_ms": round(busy_us / 1e3, 2),
        "profiled_step_wall_ms": round(wall_s * 1e3, 2),
        "gpu_busy_share": round(busy_us / 1e6 / wall_s, 4) if wall_s else None,
        "gpu_idle_share": round(1 - busy_us / 1e6 / wall_s, 4) if wall_s else None,
        "n_kernel_launches": sum(v[1] for v in per_kernel.values()),
        "categories": {c: {"ms": round(v / 1e3, 2), "share": round(v / total_us, 4),
                           "top_ops": {o: round(t / 1e3, 2) for o, t in
                                       sorted(examples[c].items(), key=lambda kv: -kv[1])[:4]}}
                       for c, v in sorted(per_cat.items(), key=lambda kv: -kv[1]) if v > 0},
        "top_kernels": [{"kernel": n[:160], "ms": round(v[0] / 1e3, 2), "share": round(v[0] / total_us, 4),
                         "calls": v[1], "category": v[2]} for n, v in kern[:top]],
        "top_launching_ops": {o: round(t / 1e3, 2) for o, t in sorted(per_op.items(), key=lambda kv: -kv[1])[:15]},
    }


def render(res: dict) -> str:
    a = res["profile"]
    lines = [f"step (unprofiled, mean of {res['bench']['steps']}): {res['bench']['step_s'] * 1e3:.1f} ms; "
             f"profiled step wall {a['profiled_step_wall_ms']:.1f} ms; kernel time {a['kernel_time_ms']:.1f} ms; "
             f"GPU busy {a['busy_ms']:.1f} ms = {100 * (a['gpu_busy_share'] or 0):.1f}% "
             f"(idle {100 * (a['gpu_idle_share'] or 0):.1f}%); {a['n_kernel_launches']} kernel launches",
             f"MFU (unprofiled): {100 * res['bench']['mfu']:.1f}%  tokens/s {res['bench']['tokens_per_s']}",
             "", "| category | ms | share | top launching ops (ms) |", "|---|---:|---:|---|"]
    for c, v in a["categories"].items():
        ops = ", ".join(f"{o} {t}" for o, t in v["top_ops"].items())
        lines.append(f"| {c} | {v['ms']:.1f} | {100 * v['share']:.1f}% | {ops} |")
    lines += ["", "| # | kernel | ms | share | calls | category |", "|---:|---|---:|---:|---:|---|"]
    for i, k in enumerate(a["top_kernels"], 1):
        lines.append(f"| {i} | `{k['kernel'][:90]}` | {k['ms']:.1f} | {100 * k['share']:.1f}% | {k['calls']} | "
                     f"{k['category']} |")
    if res.get("alloc_ab"):
        lines += ["", f"PYTORCH_CUDA_ALLOC_CONF A/B: {json.dumps(res['alloc_ab'])}"]
    return "\n".join(lines)


def _step_only(layers: int) -> None:
    """Child of the allocator A/B: print measure()'s step time as JSON (env set by the parent)."""
    from bench_actor import measure

    r = measure(seq=4096, micro_batch=1, steps=2, warmup=1, layers=layers, **QWEN25_15B)
    print("ABRESULT " + json.dumps({k: r[k] for k in ("step_s", "mfu", "tokens_per_s", "peak_mem_gib")}))


def alloc_ab(layers: int, deadline: float) -> dict:
    out = {"layers": layers}
    for name, val in (("default", None), ("expandable_segments", "expandable_segments:True")):
        left = deadline - time.time()
        if left < 25:
            out[name] = f"skipped: {left:.0f} s left"
            continue
        env = dict(os.environ)
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        if val:
            env["PYTORCH_CUDA_ALLOC_CONF"] = val
        try:
            p = subprocess.run([sys.executable, __file__, "--_step-only", str(layers)], env=env, text=True,
                               capture_output=True, timeout=left)
            hit = [ln for ln in p.stdout.splitlines() if ln.startswith("ABRESULT ")]
            out[name] = json.loads(hit[-1][9:]) if hit else f"rc {p.returncode}: {p.stderr.strip()[-300:]}"
        except subprocess.TimeoutExpired:
            out[name] = "timed out"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--no-alloc-ab", action="store_true")
    ap.add_argument("--ab-layers", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=190.0, help="skip the allocator A/B past this")
    ap.add_argument("--_step-only", dest="step_only", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.step_only is not None:
        _step_only(a.step_only)
        return 0
    t_start = time.time()

    import torch
    from torch.profiler import ProfilerActivity, profile

    import bench_actor
    from megatron_dapo.actor.megatron_actor import MegatronActor

    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        print("SKIP: benchmarks/gpu/profile_actor.py needs a CUDA GPU (use --dry-run on the CPU)")
        return 0
    # remember the batch measure() trains on, to profile one more step on the same actor
    seen = {}
    orig = MegatronActor.train_step

    def spy(self, *args, **kw):
        seen["args"], seen["kw"] = args, kw
        return orig(self, *args, **kw)

    MegatronActor.train_step = spy
    try:
        if a.dry_run:
            bench = bench_actor.measure(seq=64, steps=1, warmup=1, keep_actor=True, **TINY)
        else:
            bench = bench_actor.measure(seq=a.seq, micro_batch=1, steps=1, warmup=2, layers=a.layers,
                                        keep_actor=True, **QWEN25_15B)
    finally:
        MegatronActor.train_step = orig
    actor = bench.pop("_actor")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        actor.train_step(*seen["args"], **seen["kw"])
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    actor.close()
    res = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "dry_run": a.dry_run,
           "torch": torch.__version__, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
           "bench": bench, "profile": analyse(prof, wall, cuda)}
    try:
        import megatron.core

        res["megatron_core"] = megatron.core.__version__
    except Exception:  # noqa: BLE001
        pass
    del prof
    out = Path(a.out) if a.out else None

    def write():
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / "profile.json").write_text(json.dumps(res, indent=1))
            (out / "profile.txt").write_text(render(res) + "\n")

    write()
    print(render(res), flush=True)
    if cuda and not a.no_alloc_ab:
        import gc

        del actor
        gc.collect()
        torch.cuda.empty_cache()
        res["alloc_ab"] = alloc_ab(a.ab_layers, t_start + a.budget_s)
        write()
        print("PYTORCH_CUDA_ALLOC_CONF A/B:", json.dumps(res["alloc_ab"]), flush=True)
    return 0


if __name__ == "__main__":
    rc = main()
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    sys.exit(rc)
