"""Worker for tests/test_moe_parity.py, under ``torchrun --nproc_per_node=2`` (gloo, CPU): one launch checks

1. ``hf_to_megatron(..., ep=2)``: each expert-parallel rank writes only its 2 of the 4 experts;
2. fp64 logits of the Megatron model (loaded from that checkpoint) equal transformers' at EP=1 and at EP=2;
3. gradients at EP=2 (each rank half the batch; dense gradients summed over the ranks) equal the EP=1 ones of
   the whole batch;
4. ``megatron_to_hf`` of the EP=2 checkpoint reproduces every HF tensor bit-exactly;
5. ``MegatronActor`` at EP=2 against EP=1 and transformers (:func:`_actor_checks`);
6. a second model (``norm_topk_prob=false``, ``decoder_sparse_step=2``): fp64 logits at EP=2;
7. ``tools/convert_hf_to_megatron.py --ep 2 --verify`` exits 0 (run last: the tool ends the process group).

Env: HF_DIR (the tiny Qwen3-MoE), HF_DIR_PLAIN_TOPK (the second one), WORK (scratch dir), OUT (directory for
``rank<r>.json``).
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _tensors(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _forward_backward(convert, mapping, spec, ckpt, ep, tokens, weights):
    """fp64 logits [n, s, V] and {canonical name: fp64 grad} of ``sum(logits * weights)`` at EP=ep."""
    import torch

    with convert.megatron_model(spec, ep=ep) as mm:
        model = mm["model"]
        convert.load_megatron_model(model, ckpt)
        model.double()
        convert.exact_moe_routing()
        b, s = tokens.shape
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        causal = torch.ones(s, s, dtype=torch.bool).triu(1).view(1, 1, s, s)
        with convert.device_remap():
            logits = model(tokens, pos, causal)[..., :spec.vocab_size]
            (logits * weights).sum().backward()
        grads = {c: p.grad.detach().clone() for c, _, p in mapping.local_params(model, spec)}
        experts = sorted({mapping.expert_index(c) for c in grads} - {None})
        return logits.detach(), grads, experts


def _actor_checks(hf, spec, torch, mapping):
    """MegatronActor on the tiny MoE at EP=1 and EP=2 (5 sequences, micro-batches of <= 24 tokens: the two
    data-parallel ranks get 2 and 3 micro-batches of their own): log-probs against transformers (fp32), gradients of
    one DAPO loss step EP=2 vs EP=1, and the HF tensors the actor exports at EP=2."""
    from megatron_dapo.actor.batching import balance_across_ranks, build_actor_batch, make_micro_batches
    from megatron_dapo.actor.megatron_actor import LossSettings, MegatronActor
    from megatron_dapo.config import ActorConfig
    from parity_worker import hf_logprobs

    g = torch.Generator().manual_seed(3)
    # lengths 11, 17, 21, 14, 5: the ranks get [11, 21] (2 micro-batches) and [17, 14, 5] (3)
    prompts = [torch.randint(0, 150, (n,), generator=g).tolist() for n in (5, 7, 9, 6, 2)]
    resps = [torch.randint(0, 150, (n,), generator=g).tolist() for n in (6, 10, 12, 8, 3)]
    b = build_actor_batch(prompts, resps)
    out = {}
    for ep in (1, 2):
        cfg = ActorConfig(expert_model_parallel_size=ep, lr=1e-3, lr_warmup_steps=0, weight_decay=0.0, clip_grad=0.0,
                          max_tokens_per_gpu=24, logprob_chunk_size=7)
        actor = MegatronActor(hf, cfg, total_train_steps=2)
        lp, _ = actor.compute_logprobs(b)
        g = torch.Generator().manual_seed(1)
        b.old_logprobs = lp + 0.05 * torch.randn(lp.shape, generator=g) * b.response_mask
        b.advantages = torch.randn(len(b), 1, generator=g).expand_as(lp).contiguous() * b.response_mask
        actor.train_step(b, LossSettings(), apply_update=False)
        out[ep] = {"lp": lp, "grads": {n: t.clone() for n, t in actor.iter_full_grads()},
                   "hf": {n: t.clone() for n, t in actor.iter_hf_tensors()}, "num_mb": actor._num_mb}
        actor.close()
    ref_lp, _ = hf_logprobs(str(hf), b)
    lengths = b.seq_lengths.tolist()
    own = [len(make_micro_batches([lengths[i] for i in rows], 24, None)) for rows in balance_across_ranks(lengths, 2)]
    res = {"actor_own_mb_counts": own, "actor_num_mb_ep2": out[2]["num_mb"],
           "actor_lp_vs_hf": float((out[2]["lp"] - ref_lp).abs().max()),
           "actor_lp_ep2_vs_ep1": float((out[2]["lp"] - out[1]["lp"]).abs().max()),
           "actor_yields": len(out[2]["grads"]) > 0}
    if out[2]["grads"]:  # data-parallel rank 0 only
        g1, g2 = out[1]["grads"], out[2]["grads"]
        res["actor_grad_names_equal"] = sorted(g1) == sorted(g2) == sorted(mapping.mcore_names(spec))
        res["actor_grad_max_rel"] = max(float((g2[n] - g1[n]).abs().max() / g1[n].abs().max().clamp_min(1e-30))
                                        for n in g1)
        res["actor_expert_grads_nonzero"] = all(bool(g2[n].abs().max() > 0) for n in g2
                                                if mapping.expert_index(n) is not None)
        ref = _tensors(hf)
        res["actor_export_bit_exact"] = sorted(ref) == sorted(out[2]["hf"]) and all(
            torch.equal(ref[k], out[2]["hf"][k]) for k in ref)
    return res


def main():
    import torch
    import torch.distributed as dist

    from megatron_dapo.models import convert, mapping
    from megatron_dapo.models.hf_config import spec_from_hf_config

    hf, work, out = Path(os.environ["HF_DIR"]), Path(os.environ["WORK"]), Path(os.environ["OUT"])
    rank = int(os.environ["RANK"])
    spec = spec_from_hf_config(hf)
    res = {}

    ckpt = work / "mc_ep2"
    convert.hf_to_megatron(hf, ckpt, ep=2, progress=False)
    tokens = convert.fixed_batch(spec.vocab_size, n=4, length=12, seed=1)
    weights = torch.randn(tokens.shape + (spec.vocab_size,), generator=torch.Generator().manual_seed(2),
                          dtype=torch.float64)
    hf64 = convert.hf_logits(hf, tokens, fp64=True)

    ref_logits, ref_grads, ref_experts = _forward_backward(convert, mapping, spec, ckpt, 1, tokens, weights)
    res["ep1_max_abs_logits"] = float((ref_logits - hf64).abs().max())
    res["ep1_experts"] = ref_experts

    rows = slice(2 * rank, 2 * rank + 2)
    logits, grads, experts = _forward_backward(convert, mapping, spec, ckpt, 2, tokens[rows], weights[rows])
    res["ep2_max_abs_logits"] = float((logits - hf64[rows]).abs().max())
    res["ep2_experts"] = experts
    worst, worst_name = 0.0, None
    for name in sorted(grads):
        g = grads[name]
        if mapping.expert_index(name) is None:  # replicated over the two ranks: each saw half the batch
            dist.all_reduce(g)
        rel = float((g - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp_min(1e-300))
        if rel >= worst:
            worst, worst_name = rel, name
    res["ep2_grad_max_rel"], res["ep2_grad_worst"] = worst, worst_name
    res["ep2_grad_names"] = len(grads)
    res["ep2_router_grad_nonzero"] = bool(grads["decoder.layers.0.mlp.router.weight"].abs().max() > 0)
    # every local expert received tokens (routing spreads over all experts, on both ranks)
    res["ep2_expert_grads_nonzero"] = all(bool(g.abs().max() > 0) for n, g in grads.items()
                                          if mapping.expert_index(n) is not None)

    back = work / f"hf_back_{rank}"
    convert.megatron_to_hf(ckpt, back, progress=False)
    a, b = _tensors(hf), _tensors(back)
    res["round_trip_same_keys"] = sorted(a) == sorted(b)
    res["round_trip_bit_exact"] = all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a if k in b)

    res.update(_actor_checks(hf, spec, torch, mapping))

    # plain top-k probabilities (norm_topk_prob=false: moe_router_pre_softmax) and decoder_sparse_step=2, at EP=2
    hf2 = Path(os.environ["HF_DIR_PLAIN_TOPK"])
    spec2 = spec_from_hf_config(hf2)
    ckpt2 = work / "mc_plain_topk"
    convert.hf_to_megatron(hf2, ckpt2, ep=2, progress=False)
    logits2, _, _ = _forward_backward(convert, mapping, spec2, ckpt2, 2, tokens[rows], weights[rows])
    res["plain_topk_moe_layers"] = list(spec2.moe_layers)
    res["plain_topk_max_abs_logits"] = float((logits2 - convert.hf_logits(hf2, tokens, fp64=True)[rows]).abs().max())

    from tools.convert_hf_to_megatron import main as convert_tool

    res["tool_rc"] = convert_tool(["--hf", str(hf), "--out", str(work / "mc_tool"), "--ep", "2", "--verify"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
