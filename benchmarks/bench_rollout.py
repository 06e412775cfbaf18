"""CPU engine throughput: one-request-at-a-time vs concurrent requests merged into one decode batch.

Run: ``.venv/bin/python benchmarks/bench_rollout.py`` (starts one CPU engine on a tiny random Qwen2).
Prints generated tokens/s for both modes and their ratio, measured in this one run.
"""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_dapo.engines.client import EngineClient  # noqa: E402
from megatron_dapo.engines.launch_cpu import launch_cpu_engines  # noqa: E402

N_PROMPTS, NEW_TOKENS = 16, 64


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=4096)
        Qwen2ForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
        prompts = [[1 + (i * 7 + j) % 1000 for j in range(16 + i)] for i in range(N_PROMPTS)]
        sp = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True, "temperature": 1.0, "sampling_seed": 0}
        with launch_cpu_engines(d, 1, log_dir=f"{d}/logs") as procs:
            async def run():
                async with EngineClient(procs.urls) as c:
                    await c.generate(prompts[:2], sp)  # warm-up
                    t0 = time.perf_counter()
                    for p in prompts:
                        await c.generate([p], sp)
                    seq = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    await c.generate(prompts, sp)  # 16 concurrent requests -> merged batch
                    bat = time.perf_counter() - t0
                    return seq, bat

            seq, bat = asyncio.run(run())
        toks = N_PROMPTS * NEW_TOKENS
        print(f"sequential: {toks / seq:8.1f} tok/s ({seq:.2f}s)")
        print(f"batched   : {toks / bat:8.1f} tok/s ({bat:.2f}s)")
        print(f"speed-up batched/sequential: {seq / bat:.2f}x")


if __name__ == "__main__":
    main()
