"""torchrun worker for tests/test_actor_parity.py: one launch per parallel layout, all model families.

For every layout in ``LAYOUTS`` (``;``-separated, each ``key=value,...`` with keys tp, pp, vpp, first,
last (uneven pipeline stages), sp (sequence parallel), pack (THD packing), distopt_cmp) and every HF checkpoint directory in ``HF_DIRS`` (comma
separated) it builds a :class:`MegatronActor`, computes log-probs/entropies of a fixed batch and the DP-reduced gradients of one DAPO loss
step (``apply_update=False``), and rank 0 writes ``{layout: {family: {...}}}`` to ``OUT`` (torch.save).
With ``HF_REF=1`` it also adds transformers' log-probs of the same batch. With ``distopt_cmp=1`` it
instead runs one Adam step with and without the distributed optimizer and stores both updated
parameter sets.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

VOCAB_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def make_batch():
    """Fixed batch: 6 sequences of different prompt/response lengths over token ids < 300."""
    import torch

    from megatron_dapo.actor.batching import build_actor_batch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 7, 3, 9, 4, 6)]
    resps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (6, 2, 8, 4, 11, 3)]
    return build_actor_batch(prompts, resps)


def hf_logprobs(path, batch, temperature=1.0):
    """transformers' per-token log-probs/entropies in the actor's ``[N, L]`` alignment (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lp = torch.zeros(batch.input_ids.shape)
    ent = torch.zeros(batch.input_ids.shape)
    with torch.no_grad():
        for i in range(len(batch)):
            n = int(batch.seq_lengths[i])
            ids = batch.input_ids[i: i + 1, :n]
            logits = hf(ids).logits[0].float() / temperature
            logp = torch.log_softmax(logits, -1)
            lp[i, 1:n] = logp[:-1].gather(1, ids[0, 1:, None]).squeeze(1)
            ent[i, 1:n] = -(logp[:-1].exp() * logp[:-1]).sum(-1)
    return lp * batch.response_mask, ent * batch.response_mask


def _cfg(layout, **over):
    from megatron_dapo.config import ActorConfig

    env = layout
    kw = dict(tensor_model_parallel_size=int(env.get("tp", 1)), pipeline_model_parallel_size=int(env.get("pp", 1)),
              virtual_pipeline_model_parallel_size=int(env["vpp"]) if env.get("vpp") else None,
              lr=1e-3, lr_warmup_steps=0, weight_decay=0.0, clip_grad=0.0, max_tokens_per_gpu=24,
              logprob_chunk_size=7, sequence_parallel=env.get("sp") == "1", pack_sequences=env.get("pack") == "1")
    kw.update(over)
    cfg = ActorConfig(**kw)
    if env.get("first"):
        cfg.num_layers_in_first_pipeline_stage = int(env["first"])
        cfg.num_layers_in_last_pipeline_stage = int(env["last"])
    return cfg


def _layers_per_stage(actor):
    import torch.distributed as dist

    mine = sum(len(c.module.decoder.layers) if hasattr(c.module, "decoder") else 0 for c in actor.chunks)
    out = [None] * actor.pp
    dist.all_gather_object(out, mine, group=actor.ps.get_pipeline_model_parallel_group())
    return out


def run_family(path, layout, res_for_family):
    import torch

    from megatron_dapo.actor.megatron_actor import LossSettings, MegatronActor

    env = os.environ
    b = make_batch()
    if layout.get("distopt_cmp") == "1":
        for tag, dopt in (("regular", False), ("distopt", True)):
            actor = MegatronActor(path, _cfg(layout, use_distributed_optimizer=dopt), total_train_steps=4)
            lp, _ = actor.compute_logprobs(b)
            g = torch.Generator().manual_seed(1)
            b.old_logprobs = lp + 0.05 * torch.randn(lp.shape, generator=g) * b.response_mask
            b.advantages = torch.randn(len(b), 1, generator=g).expand_as(lp).contiguous() * b.response_mask
            m = actor.train_step(b, LossSettings())
            res_for_family[tag] = {"params": {n: t.clone() for n, t in actor.iter_hf_tensors()},
                                   "grad_norm": m["grad_norm"]}
            actor.close()
        return
    actor = MegatronActor(path, _cfg(layout), total_train_steps=4)
    res_for_family["layers_per_stage"] = _layers_per_stage(actor)
    res_for_family["sequence_parallel"] = bool(actor.tconfig.sequence_parallel)
    res_for_family["sp_norm_params"] = sum(1 for c in actor.chunks for p in c.parameters()
                                           if getattr(p, "sequence_parallel", False))
    lp, ent = actor.compute_logprobs(b)
    lp_t, _ = actor.compute_logprobs(b, temperature=0.7)
    g = torch.Generator().manual_seed(1)
    b.old_logprobs = lp + 0.05 * torch.randn(lp.shape, generator=g) * b.response_mask
    b.advantages = torch.randn(len(b), 1, generator=g).expand_as(lp).contiguous() * b.response_mask
    metrics = actor.train_step(b, LossSettings(entropy_coeff=0.01), apply_update=False)
    vocab = actor.spec.vocab_size
    grads = {}
    for name, t in actor.iter_full_grads():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = t[:vocab]
        grads[name] = t.clone()
    res_for_family.update(logprobs=lp, entropy=ent, logprobs_t07=lp_t, grads=grads,
                          pg_loss=metrics["pg_loss"], mask=b.response_mask)
    if env.get("HF_REF") == "1":
        ref_lp, ref_ent = hf_logprobs(path, b)
        ref_lp_t, _ = hf_logprobs(path, b, temperature=0.7)
        res_for_family.update(hf_logprobs=ref_lp, hf_entropy=ref_ent, hf_logprobs_t07=ref_lp_t)
    actor.close()


def main():
    import torch
    import torch.distributed as dist

    from megatron_dapo.models.hf_config import spec_from_hf_config

    results = {}
    for spec in os.environ.get("LAYOUTS", "tp=1").split(";"):
        layout = dict(kv.split("=") for kv in spec.split(",") if kv)
        results[spec] = {}
        for path in os.environ["HF_DIRS"].split(","):
            fam = spec_from_hf_config(path).family
            results[spec][fam] = {}
            run_family(path, layout, results[spec][fam])
    if dist.get_rank() == 0:
        torch.save(results, os.environ["OUT"])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
