"""torchrun worker for tests/test_attention_backend.py: ``sdpa`` against ``local`` core attention.

For every layout in ``LAYOUTS`` (``;``-separated, each ``key=value,...`` with keys tp, pp, sp, pack; see
parity_worker.py) and both backends it builds a :class:`MegatronActor` from the HF checkpoint ``HF_DIR``,
computes the log-probs of parity_worker's fixed batch and the full gradients of one DAPO loss step
(``apply_update=False``); rank 0 saves ``{layout: {backend: {...}}}`` to ``OUT`` (torch.save).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(path, layout, backend):
    import torch

    from megatron_dapo.actor.attention import SDPAttention
    from megatron_dapo.actor.megatron_actor import LossSettings, MegatronActor
    from parity_worker import _cfg, make_batch

    b = make_batch()
    actor = MegatronActor(path, _cfg(layout, attention_backend=backend), total_train_steps=4)
    cores = [type(m.self_attention.core_attention).__name__ for c in actor.chunks
             for m in c.module.decoder.layers]
    lp, _ = actor.compute_logprobs(b)
    g = torch.Generator().manual_seed(1)
    b.old_logprobs = lp + 0.05 * torch.randn(lp.shape, generator=g) * b.response_mask
    b.advantages = torch.randn(len(b), 1, generator=g).expand_as(lp).contiguous() * b.response_mask
    actor.train_step(b, LossSettings(entropy_coeff=0.01), apply_update=False)
    grads = {name: t.clone() for name, t in actor.iter_full_grads()}
    out = dict(logprobs=lp, grads=grads, mask=b.response_mask, core_attention=sorted(set(cores)),
               sdpa_modules=sum(isinstance(m, SDPAttention) for c in actor.chunks for m in c.modules()),
               sequence_parallel=bool(actor.tconfig.sequence_parallel))
    actor.close()
    return out


def main():
    import torch
    import torch.distributed as dist

    results = {}
    for spec in os.environ["LAYOUTS"].split(";"):
        layout = dict(kv.split("=") for kv in spec.split(",") if kv)
        results[spec] = {backend: run(os.environ["HF_DIR"], layout, backend) for backend in ("local", "sdpa")}
    if dist.get_rank() == 0:
        torch.save(results, os.environ["OUT"])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
