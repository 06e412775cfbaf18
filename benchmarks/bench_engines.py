"""Rollout engines side by side: our CPU engine, real SGLang (CPU) and real vLLM (CPU) in ONE run.

Run: ``MEGATRON_DAPO_ENGINE_VENV_ROOT=/path/with/venvs .venv/bin/python benchmarks/bench_engines.py``
(``make engines`` builds ``.venv-sglang`` / ``.venv-vllm``).  Every engine gets the same tiny fp32 model
(random Qwen2, hidden 64, 2 layers, head size 32, tied embeddings), the same 16 prompts x n=4 samples x 64
new tokens (temperature 1.0, ``ignore_eos``), sent as one concurrent batch through the project's client
after a warm-up request; engines run one after another (never two at once) with one OpenMP thread.
Prints generated tokens/s per engine and every ratio.  An engine that cannot start (no venv, no vLLM
client) is reported as skipped with the reason.  Options: ``--engines cpu,sglang,vllm``, ``--rounds N``
(best of N timed batches, default 2).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

N_PROMPTS, N_SAMPLES, NEW_TOKENS = 16, 4, 64
MODEL_KW = dict(hidden_size=64, num_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128,
                max_position_embeddings=2048, initializer_range=0.3, seed=0)


def _start(kind: str, model: str, log_dir: str):
    if kind == "cpu":
        from megatron_dapo.engines.launch_cpu import launch_cpu_engines

        return launch_cpu_engines(model, 1, log_dir=log_dir, health_timeout_s=300)
    if kind == "sglang":
        from megatron_dapo.engines.launch_sglang import launch_sglang_servers

        return launch_sglang_servers(model, num_engines=1, base_port=None, device="cpu", dtype="float32",
                                     log_dir=log_dir, health_timeout_s=900)
    if kind == "vllm":
        from megatron_dapo.engines.launch_vllm import launch_vllm_servers

        return launch_vllm_servers(model, num_engines=1, log_dir=log_dir)
    raise ValueError(kind)


def _client(kind: str, urls, model: str):
    if kind == "vllm":
        from megatron_dapo.engines.vllm_client import VLLMClient

        return VLLMClient(urls, request_timeout_s=1800)  # the launcher serves one model, named "policy"
    from megatron_dapo.engines.client import EngineClient

    return EngineClient(urls, request_timeout_s=1800)


def bench(kind: str, model: str, log_dir: str, rounds: int) -> tuple[float, float]:
    """(tokens/s of the best timed batch, start-up seconds)."""
    prompts = [[3 + (i * 7 + j) % 140 for j in range(8 + i % 8)] for i in range(N_PROMPTS)]
    sp = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True, "temperature": 1.0, "n": N_SAMPLES}
    t0 = time.perf_counter()
    procs = _start(kind, model, log_dir)
    startup = time.perf_counter() - t0
    try:
        async def run() -> float:
            async with _client(kind, procs.urls, model) as c:
                await c.generate(prompts[:2], {**sp, "n": 1, "max_new_tokens": 8})  # warm-up
                best = float("inf")
                for _ in range(rounds):
                    t = time.perf_counter()
                    outs = await c.generate(prompts, sp)
                    best = min(best, time.perf_counter() - t)
                    assert sum(len(o.output_ids) for o in outs) == N_PROMPTS * N_SAMPLES * NEW_TOKENS
                return best

        best = asyncio.run(run())
    finally:
        procs.stop()
    return N_PROMPTS * N_SAMPLES * NEW_TOKENS / best, startup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="cpu,sglang,vllm")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from megatron_dapo.data.tiny_checkpoint import make_tiny_checkpoint

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        model = str(make_tiny_checkpoint(os.path.join(d, "model"), **MODEL_KW))
        for kind in [k for k in args.engines.split(",") if k]:
            try:
                tps, startup = bench(kind, model, os.path.join(d, f"logs_{kind}"), args.rounds)
            except Exception as exc:  # report and go on with the others
                print(f"{kind:7s}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", flush=True)
                continue
            results[kind] = tps
            print(f"{kind:7s}: {tps:8.1f} generated tokens/s  (start-up {startup:.0f} s)", flush=True)
    print(f"workload: {N_PROMPTS} prompts x n={N_SAMPLES} x {NEW_TOKENS} new tokens, fp32, 1 thread per engine")
    kinds = list(results)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            print(f"ratio {a}/{b}: {results[a] / results[b]:.2f}x")


if __name__ == "__main__":
    main()
