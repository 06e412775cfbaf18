"""Benchmark of the rule-based math reward (megatron_dapo.reward). Runs in < 60 s on 2 cores.

1. DAPO rule on ~64 KB responses with the answer on the last line: responses/s on one core and
   per-call latency percentiles, next to an inline baseline ("take the last line, strip, compare
   strings") that does no normalisation at all.
2. math-verify path (MATH-500-style LaTeX answers, worker processes): responses/s with 1 and 2
   workers, and per-call latency of ``compute_score``.

Usage: python benchmarks/bench_reward.py [--n 2000] [--mv-n 400]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_dapo.reward import compute_score, get_pool, score_batch  # noqa: E402

WORDS = ("we have so the sum of and therefore let x y n be integer then since it follows that "
         "$a^2 + b^2 = c^2$ \\frac{1}{2} compute check modulo prime divides").split()
FORMATS = ("Answer: {}", "Answer: ${}$", "**Answer:** {}", "Answer: \\boxed{{{}}}", "answer: {}.")
MV_FALLBACK = ["\\frac{14}{3}", "3\\sqrt{13}", "\\left( 3, \\frac{\\pi}{2} \\right)", "(-2,1)",
               "x^3+3x-6", "\\frac{3\\sqrt{3}}{4}", "[0, 1)", "6 - 5i", "\\pi", "11\\sqrt2"]


def make_response(rng: random.Random, size: int, answer: str, fmt: str) -> str:
    parts, n = [], 0
    while n < size:
        w = rng.choice(WORDS) if rng.random() < 0.85 else str(rng.randint(0, 9999))
        parts.append(w)
        n += len(w) + 1
        if rng.random() < 0.04:
            parts.append("\n")
    body = " ".join(parts)
    tail = "\n" + fmt.format(answer)
    return body[: size - len(tail)] + tail


def baseline(response: str, ground_truth: str) -> bool:
    """No normalisation at all: last line, stripped, equal to 'Answer: <gt>'."""
    return response.rstrip().rsplit("\n", 1)[-1].strip() == "Answer: " + ground_truth


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def bench_dapo(n: int, size: int) -> dict:
    rng = random.Random(0)
    gts = [str(rng.randint(0, 99999)) for _ in range(n)]
    bodies = [make_response(rng, size, "", "") for _ in range(16)]
    responses = []
    for i, g in enumerate(gts):
        tail = FORMATS[i % len(FORMATS)].format(g if rng.random() < 0.5 else str(int(g) + 1))
        responses.append(bodies[i % 16][: size - len(tail)] + tail)
    for r, g in zip(responses[:50], gts[:50]):  # warm-up
        compute_score(r, g)
    lat = []
    t0 = time.perf_counter()
    for r, g in zip(responses, gts):
        s = time.perf_counter_ns()
        compute_score(r, g, data_source="math_dapo")
        lat.append((time.perf_counter_ns() - s) / 1e3)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(3):
        for r, g in zip(responses, gts):
            baseline(r, g)
    base = (time.perf_counter() - t0) / 3
    t0 = time.perf_counter()
    score_batch(responses, gts, "math_dapo")
    batch = time.perf_counter() - t0
    return {"n": n, "bytes": size, "ours_rps": n / ours, "batch_rps": n / batch,
            "baseline_rps": n / base, "ratio_time_vs_baseline": ours / base,
            "p50_us": percentile(lat, 50), "p99_us": percentile(lat, 99),
            "max_us": max(lat)}


def math500_answers() -> list[str]:
    shared = Path(os.environ.get("MEGATRON_DAPO_SHARED", ROOT.parent / "shared"))
    p = shared / "data" / "math500" / "test.jsonl"
    if p.exists():
        return [json.loads(line)["answer"] for line in p.read_text().splitlines() if line.strip()]
    return MV_FALLBACK


def bench_math_verify(n: int) -> dict:
    answers = math500_answers()
    # non-integer references only: integer pairs are compared in-process (fast path)
    answers = [a for a in answers if not a.strip().lstrip("-").isdigit()]
    rng = random.Random(1)
    rows = [answers[i % len(answers)] for i in range(n)]
    responses = ["Reasoning ... " * 200 + "\nAnswer: $" + (a if rng.random() < 0.7 else "\\frac{9973}{7919}")
                 + "$" for a in rows]
    out = {"n": n}
    for workers in (1, 2):
        pool = get_pool(workers)
        t0 = time.perf_counter()
        pool.warmup()
        out[f"startup_s_w{workers}"] = time.perf_counter() - t0
        score_batch(responses[:20], rows[:20], "math500", num_workers=workers)  # warm caches
        t0 = time.perf_counter()
        res = score_batch(responses, rows, "math500", num_workers=workers, timeout_s=5.0)
        out[f"rps_w{workers}"] = n / (time.perf_counter() - t0)
        out[f"timeouts_w{workers}"] = sum(r.status == "timeout" for r in res)
    lat = []
    for r, g in zip(responses[:200], rows[:200]):
        s = time.perf_counter_ns()
        compute_score(r, g, data_source="math500", timeout_s=5.0)
        lat.append((time.perf_counter_ns() - s) / 1e6)
    out["single_p50_ms"] = statistics.median(lat)
    out["single_p99_ms"] = percentile(lat, 99)
    out["single_rps"] = len(lat) / (sum(lat) / 1e3)
    t0 = time.perf_counter()
    r = compute_score("Answer: $10^{10^{10^{10}}}$", "\\frac12", data_source="math500",
                      timeout_s=1.0)
    out["timeout_item_s"] = time.perf_counter() - t0
    out["timeout_item_status"] = r.status
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="DAPO-rule responses")
    ap.add_argument("--bytes", type=int, default=64 * 1024, help="response size (characters)")
    ap.add_argument("--mv-n", type=int, default=400, help="math-verify responses")
    args = ap.parse_args()
    t_all = time.perf_counter()
    d = bench_dapo(args.n, args.bytes)
    print(f"DAPO rule, {d['n']} x {d['bytes'] // 1024} KB responses, one core:")
    print(f"  compute_score      {d['ours_rps']:10.0f} responses/s   p50 {d['p50_us']:.1f} us   "
          f"p99 {d['p99_us']:.1f} us   max {d['max_us']:.1f} us")
    print(f"  score_batch        {d['batch_rps']:10.0f} responses/s")
    print(f"  baseline last-line {d['baseline_rps']:10.0f} responses/s")
    print(f"  time ratio ours/baseline = {d['ratio_time_vs_baseline']:.2f}x")
    m = bench_math_verify(args.mv_n)
    print(f"math-verify path, {m['n']} MATH-500 LaTeX answers:")
    print(f"  worker start-up {m['startup_s_w1']:.2f} s; 1 worker {m['rps_w1']:.0f} responses/s; "
          f"2 workers {m['rps_w2']:.0f} responses/s (timeouts {m['timeouts_w1']}/{m['timeouts_w2']})")
    print(f"  compute_score single calls: {m['single_rps']:.0f} responses/s, "
          f"p50 {m['single_p50_ms']:.2f} ms, p99 {m['single_p99_ms']:.2f} ms")
    print(f"  DAPO-rule / math-verify(2 workers) throughput ratio = "
          f"{d['ours_rps'] / m['rps_w2']:.0f}x")
    print(f"  power-tower item: {m['timeout_item_status']} after {m['timeout_item_s']:.2f} s "
          f"(limit 1 s)")
    print(f"total {time.perf_counter() - t_all:.1f} s")


if __name__ == "__main__":
    main()
