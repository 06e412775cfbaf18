"""Per-rank batch memory: every rank holding the whole padded batch (before) vs each DP rank receiving only
its rows (``megatron_dapo.actor.dispatch``), at the 32B example's batch shape with DP=4 on CPU.

The batch: 512 prompts x G=16 = 8,192 responses (``examples/qwen2.5-32b/dapo.yaml``), prompts up to 2,048 and
responses up to 20,480 tokens (rows up to 22.5k), lengths divided by ``--length-scale`` (default 16) so it
fits a small container; the ratio is a ratio of token counts, so the scale leaves it about unchanged.
Response lengths: 10 % truncated at the limit, the rest uniform in [1, limit]; every response has engine
log-probs. Updates: ``ppo_mini_batch_size`` 512, one epoch (the example's settings).

Each rank's tensors are simulated in one process with the real code of each path, and the bytes of the
tensors alive at every phase are summed (``numel * element_size``); a rank's peak is the max over phases:

* full (the previous trainer): every rank builds the padded ``ActorBatch`` of all rows (ids int64, response
  mask, advantages and rollout log-probs fp32 ``[N, L]``), gets ``[2, N, L]`` fp32 old log-probs/entropies
  from ``compute_logprobs``, then selects each mini-batch from it;
* sharded: rank 0 builds the flat rows (``flatten_groups``) and the plan (``plan_step``) and packs one
  DP rank's shard at a time (``dispatch._pack``: the buffers broadcast on the wire; its own shard stays a view
  of its buffers); a rank receives its shard's buffers (``_unpack``: views), pads it
  (``FlatBatch.to_actor_batch``), drops the buffers, gets ``[2, n_d, L_d]`` local log-probs and selects its
  share of each mini-batch.

    python benchmarks/bench_batch_dispatch.py [--length-scale 16] [--dp 4]

The last line printed is ``per-rank peak bytes sharded/full = X`` (goal <= 0.35; max over ranks of the
sharded peak divided by the full peak).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_dapo.actor.batching import ActorBatch, FlatBatch  # noqa: E402
from megatron_dapo.actor.dispatch import _pack, _unpack, plan_step, shard_for  # noqa: E402
from megatron_dapo.algorithm import Group, flatten_groups, resolve_preset  # noqa: E402


def nbytes(*objs) -> int:
    """Bytes of the tensors in ``objs`` (tensors, ActorBatch, FlatBatch, tuples of tensors; None ignored)."""
    total = 0
    for o in objs:
        if o is None:
            continue
        if isinstance(o, torch.Tensor):
            total += o.numel() * o.element_size()
        elif isinstance(o, FlatBatch):
            total += o.nbytes()
        elif isinstance(o, ActorBatch):
            total += nbytes(o.input_ids, o.seq_lengths, o.response_mask, o.old_logprobs, o.advantages,
                            o.rollout_logprobs, o.ref_logprobs)
        else:
            total += nbytes(*o)
    return total


def make_groups(num_prompts: int, g_size: int, max_prompt: int, max_response: int, seed: int = 0) -> list[Group]:
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for p in range(num_prompts):
        plen = int(torch.randint(max(1, max_prompt // 8), max_prompt + 1, (1,), generator=gen))
        prompt = torch.randint(0, 150_000, (plen,), generator=gen).tolist()
        truncated = torch.rand(g_size, generator=gen) < 0.10
        lens = torch.where(truncated, torch.full((g_size,), max_response),
                           torch.randint(1, max_response + 1, (g_size,), generator=gen)).tolist()
        resps = [torch.randint(0, 150_000, (n,), generator=gen).tolist() for n in lens]
        rewards = (torch.randint(0, 2, (g_size,), generator=gen) * 2 - 1).float().tolist()
        groups.append(Group(prompt_index=p, prompt_ids=prompt, responses=resps, rewards=rewards,
                            correct=[r > 0 for r in rewards],
                            finish_reasons=["length" if t else "stop" for t in truncated.tolist()],
                            rollout_logprobs=[(-torch.rand(n, generator=gen)).tolist() for n in lens]))
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length-scale", type=int, default=16, help="divide the 32B example's lengths by this")
    ap.add_argument("--dp", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--mini-batch", type=int, default=512)
    args = ap.parse_args()
    t0 = time.perf_counter()
    max_prompt, max_response = 2048 // args.length_scale, 20480 // args.length_scale
    groups = make_groups(args.prompts, args.group_size, max_prompt, max_response)
    sw = resolve_preset("dapo", {"max_response_length": max_response, "overlong_buffer_length": max_response // 5})
    t_groups = time.perf_counter() - t0

    # rank 0 builds the flat rows and the plan (both paths start from these rows)
    flat = flatten_groups(groups, sw)
    n = len(flat)
    gen = torch.Generator().manual_seed(7)
    plan = plan_step(flat, mini_batch_size=args.mini_batch, ppo_epochs=1, dp_size=args.dp, generator=gen)

    # ---- full: every rank holds the padded batch of all rows + [2, N, L] old log-probs / entropies
    full = flat.to_actor_batch()
    lp_full = torch.zeros(2, *full.input_ids.shape)
    mb_full = max(nbytes(full.select([plan.rank_rows[d][j] for d in range(args.dp) for j in upd[d].rows]))
                  for upd in plan.updates)
    full_peak = nbytes(full, lp_full) + mb_full
    n_tok, L = int(flat.offsets[-1]), int(full.input_ids.shape[1])
    del full, lp_full

    # ---- sharded: rank 0 packs one shard at a time; each rank unpacks, pads, computes local log-probs
    peaks = []
    rank0_dispatch = 0
    for d in range(args.dp):
        wire = _pack(shard_for(flat, plan, d))
        rank0_dispatch = max(rank0_dispatch, nbytes(flat, wire))  # rank 0 also keeps its own wire (d = 0)
        recv = _unpack(*wire)  # views of the receive buffers
        received = nbytes(wire)
        del wire
        local = recv.batch.to_actor_batch()
        padding = nbytes(recv.batch, local)  # while padding, the received buffers are still alive
        recv.batch = None
        lp_local = torch.zeros(2, *local.input_ids.shape)
        mb_local = max(nbytes(local.select(list(u[d].rows))) for u in plan.updates)
        training = nbytes(local, lp_local) + mb_local
        peak = max(received, padding, training, rank0_dispatch if d == 0 else 0)
        peaks.append(peak)
        print(f"DP rank {d}: {len(plan.rank_rows[d])} rows, width {int(local.input_ids.shape[1])}; peak "
              f"{peak / 2**20:.1f} MiB (receive {received / 2**20:.1f}, pad {padding / 2**20:.1f}, "
              f"train {training / 2**20:.1f}" + (f", rank-0 dispatch {rank0_dispatch / 2**20:.1f}" if d == 0 else "")
              + " MiB)")
        del local, lp_local, recv
    print(f"batch: {n} responses, {n_tok:,} tokens (mean row {n_tok / n:.0f}, longest {L}); lengths / "
          f"{args.length_scale}; DP={args.dp}, mini-batch {args.mini_batch}; groups built in {t_groups:.1f}s, "
          f"total {time.perf_counter() - t0:.1f}s")
    print(f"full: every rank {full_peak / 2**20:.1f} MiB; sharded: max over ranks {max(peaks) / 2**20:.1f} MiB")
    print(f"per-rank peak bytes sharded/full = {max(peaks) / full_peak:.3f}")


if __name__ == "__main__":
    main()
