"""torchrun worker (2 processes, gloo) for tests/test_logprobs_chunked.py: vocab-parallel chunked
log-probs/entropy at TP=2 against the naive full-logits computation; rank 0 writes results to ``OUT``."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    import torch
    import torch.distributed as dist

    from megatron_dapo.actor.logprobs import naive_logprobs_entropy, vocab_parallel_logprobs_entropy

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    n, h, v_true, v_pad = 37, 16, 250, 256
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float()
    weight = torch.randn(v_pad, h, generator=g).float() * 0.5
    weight[v_true:] = torch.randn(v_pad - v_true, h, generator=g) * 5  # padding rows must not matter
    targets = torch.randint(0, v_true, (n,), generator=g)
    w_lp, w_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    temp = 0.7
    vl = v_pad // world
    h_loc = hidden.clone().requires_grad_(True)
    w_loc = weight[rank * vl:(rank + 1) * vl].clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs_entropy(h_loc, w_loc, targets, vocab_start=rank * vl, true_vocab_size=v_true,
                                              temperature=temp, chunk_size=5, tp_group=dist.group.WORLD)
    (lp * w_lp + ent * w_ent).sum().backward()
    grads_w = [torch.empty_like(w_loc.grad) for _ in range(world)]
    dist.all_gather(grads_w, w_loc.grad.contiguous())
    h_ref = hidden.clone().requires_grad_(True)
    w_ref = weight[:v_true].clone().requires_grad_(True)
    lp_r, ent_r = naive_logprobs_entropy(h_ref @ w_ref.t(), targets, temperature=temp)
    (lp_r * w_lp + ent_r * w_ent).sum().backward()
    if rank == 0:
        torch.save({"lp": lp.detach(), "ent": ent.detach(), "lp_ref": lp_r.detach(), "ent_ref": ent_r.detach(),
                    "grad_h": h_loc.grad, "grad_h_ref": h_ref.grad, "grad_w": torch.cat(grads_w),
                    "grad_w_ref": w_ref.grad, "v_true": v_true}, os.environ["OUT"])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
