"""Padded vs packed (THD) micro-batches in the Megatron actor: tokens processed, micro-batches, wall time.

One process (TP = PP = DP = 1, gloo, CPU), a tiny Qwen2-shaped model (hidden 64, 2 layers), one batch whose
lengths follow a DAPO-like spread (prompts 16..64 tokens, responses uniform 8..``--max-response``). The same
``max_tokens_per_gpu`` budget is used by both paths: padded micro-batches cost ``rows × longest row``
(``batching.make_micro_batches``), packed ones ``Σ padded lengths`` (``packing.make_packed_micro_batches``).
Timings of ``compute_logprobs`` and ``train_step(apply_update=False)`` are interleaved, padded/packed, one rep
at a time; medians and the packed/padded ratio are printed. Also checks that both give the same log-probs.

    python benchmarks/bench_packing.py [--seqs 32] [--max-response 512] [--budget 2048] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--max-response", type=int, default=512)
    ap.add_argument("--budget", type=int, default=2048, help="actor.max_tokens_per_gpu")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    from megatron_dapo.actor.batching import build_actor_batch, make_micro_batches
    from megatron_dapo.actor.megatron_actor import LossSettings, MegatronActor
    from megatron_dapo.actor.packing import make_packed_micro_batches
    from megatron_dapo.config import ActorConfig
    from megatron_dapo.data.tiny_checkpoint import make_tiny_checkpoint

    g = torch.Generator().manual_seed(0)
    p_lens = torch.randint(16, 65, (args.seqs,), generator=g).tolist()
    r_lens = torch.randint(8, args.max_response + 1, (args.seqs,), generator=g).tolist()
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in p_lens]
    resps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in r_lens]
    batch = build_actor_batch(prompts, resps)
    lengths = batch.seq_lengths.tolist()
    budget = max(args.budget, max(lengths))

    pad_groups = make_micro_batches(lengths, budget)
    pack_groups = make_packed_micro_batches(lengths, budget)
    pad_tokens = sum(len(gr) * max(lengths[i] for i in gr) for gr in pad_groups)
    pack_tokens = sum(lengths)
    print(f"batch: {args.seqs} sequences, lengths {min(lengths)}..{max(lengths)}, {sum(lengths)} valid tokens, "
          f"N x L = {batch.input_ids.numel()}; budget {budget} tokens per micro-batch")
    print(f"padded : {len(pad_groups)} micro-batches, {pad_tokens} tokens processed "
          f"({pad_tokens / sum(lengths):.3f} x valid)")
    print(f"packed : {len(pack_groups)} micro-batches, {pack_tokens} tokens processed "
          f"({pack_tokens / sum(lengths):.3f} x valid); packed/padded tokens = {pack_tokens / pad_tokens:.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        d = make_tiny_checkpoint(Path(tmp) / "m", family="qwen2", num_layers=2, vocab_size=300,
                                 max_position_embeddings=2048)
        cfg = ActorConfig(max_tokens_per_gpu=budget, lr=0.0, lr_warmup_steps=0, clip_grad=0.0, optimizer="sgd")
        actor = MegatronActor(d, cfg)
        lp = {}
        for pack in (False, True):
            actor.cfg.pack_sequences = pack
            lp[pack], _ = actor.compute_logprobs(batch)
        diff = float((lp[True] - lp[False]).abs().max())
        print(f"max |logprob packed - padded| = {diff:.2e}")
        batch.old_logprobs = lp[False].clone()
        batch.advantages = torch.randn(args.seqs, 1, generator=g).expand_as(lp[False]).contiguous() * batch.response_mask
        times: dict[tuple[str, bool], list[float]] = {}
        for _ in range(args.reps):
            for pack in (False, True):
                actor.cfg.pack_sequences = pack
                t0 = time.perf_counter()
                actor.compute_logprobs(batch)
                t1 = time.perf_counter()
                actor.train_step(batch, LossSettings(), apply_update=False)
                t2 = time.perf_counter()
                times.setdefault(("logprobs", pack), []).append(t1 - t0)
                times.setdefault(("train", pack), []).append(t2 - t1)
        for what in ("logprobs", "train"):
            a, b = statistics.median(times[(what, False)]), statistics.median(times[(what, True)])
            print(f"{what:8s}: padded {a * 1e3:8.1f} ms, packed {b * 1e3:8.1f} ms (median of {args.reps}); "
                  f"packed/padded = {b / a:.3f}")
        actor.close()


if __name__ == "__main__":
    main()
