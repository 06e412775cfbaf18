"""Worker for tests/test_moe_parity.py, under ``torchrun --nproc_per_node=2`` (gloo, CPU): one launch checks

1. ``hf_to_megatron(..., ep=2)``: each expert-parallel rank writes only its 2 of the 4 experts;
2. fp64 logits of the Megatron model (loaded from that checkpoint) equal transformers' at EP=1 and at EP=2;
3. gradients at EP=2 (each rank half the batch; dense gradients summed over the ranks) equal the EP=1 ones of
   the whole batch;
4. ``megatron_to_hf`` of the EP=2 checkpoint reproduces every HF tensor bit-exactly;
5. ``tools/convert_hf_to_megatron.py --ep 2 --verify`` exits 0 (run last: the tool ends the process group).

Env: HF_DIR (the tiny Qwen3-MoE), WORK (scratch dir), OUT (directory for ``rank<r>.json``).
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


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

    from tools.convert_hf_to_megatron import main as convert_tool

    res["tool_rc"] = convert_tool(["--hf", str(hf), "--out", str(work / "mc_tool"), "--ep", "2", "--verify"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
