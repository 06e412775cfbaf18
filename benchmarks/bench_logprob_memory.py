"""Peak memory of token log-prob + entropy + backward: chunked vocab-parallel kernel vs naive full logits.

Each variant runs in its own subprocess; we report the peak RSS growth (``ru_maxrss`` after the run
minus the RSS after allocating the inputs), i.e. the extra memory the computation needs.

    python benchmarks/bench_logprob_memory.py [--T 4096] [--V 152064] [--H 256] [--chunk 1024]

Defaults: Qwen2.5's vocabulary (152,064 rows) and one 4,096-token sequence. H=256 instead of the
0.5B model's 896 keeps the CPU run short; the [T, V] logits that dominate memory do not depend on H
(the inputs themselves, T×H + V×H floats, are excluded from the delta).
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(variant: str, T: int, V: int, H: int, chunk: int) -> None:
    import torch

    from megatron_dapo.actor.logprobs import naive_logprobs_entropy, vocab_parallel_logprobs_entropy

    torch.manual_seed(0)
    hidden = torch.randn(T, H).requires_grad_(True)
    weight = (torch.randn(V, H) * 0.02).requires_grad_(True)
    targets = torch.randint(0, V, (T,))
    base = _rss_kib()
    t0 = time.perf_counter()
    if variant == "chunked":
        lp, ent = vocab_parallel_logprobs_entropy(hidden, weight, targets, chunk_size=chunk)
    else:
        lp, ent = naive_logprobs_entropy(hidden @ weight.t(), targets)
    (lp.sum() + 0.01 * ent.sum()).backward()
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"variant": variant, "peak_delta_mib": (peak - base) / 1024, "seconds": secs,
                      "checksum": float(hidden.grad.double().sum())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--V", type=int, default=152064)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.T, a.V, a.H, a.chunk)
        return
    res = {}
    for variant in ("chunked", "naive"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--T", str(a.T), "--V", str(a.V),
                              "--H", str(a.H), "--chunk", str(a.chunk)], capture_output=True, text=True, check=True)
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant:8s} peak extra RSS {res[variant]['peak_delta_mib']:9.1f} MiB  time {res[variant]['seconds']:6.1f} s")
    ratio = res["chunked"]["peak_delta_mib"] / res["naive"]["peak_delta_mib"]
    same = abs(res["chunked"]["checksum"] - res["naive"]["checksum"]) <= 1e-3 * max(1.0, abs(res["naive"]["checksum"]))
    print(f"T={a.T} V={a.V} H={a.H} chunk={a.chunk}: chunked/naive peak memory ratio = {ratio:.3f} "
          f"(goal <= 0.25); time ratio = {res['chunked']['seconds'] / res['naive']['seconds']:.2f}; "
          f"grad checksums agree: {same}")


if __name__ == "__main__":
    main()
