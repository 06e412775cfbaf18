"""Worker for tests/test_convert.py (one process): HF → Megatron → HF round trips of every family, the
``--verify`` comparisons, and a shape-mismatch error; results to ``OUT`` (torch.save).

Env: MODELS (``family=dir,...``), WORK (scratch dir), TP2_CKPT (a checkpoint the test wrote with
``--tp 2`` under torchrun, exported here at TP=1), OUT.
"""
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


def main():
    import torch
    from safetensors.torch import save_file

    from megatron_dapo.models import convert
    from megatron_dapo.models.mapping import MappingError

    work = Path(os.environ["WORK"])
    models = dict(kv.split("=") for kv in os.environ["MODELS"].split(","))
    res = {}
    for fam, d in models.items():
        mc, back = work / f"mc_{fam}", work / f"hf_{fam}"
        convert.hf_to_megatron(d, mc, progress=False)
        convert.megatron_to_hf(mc, back, progress=False)
        a, b = _tensors(d), _tensors(back)
        res[fam] = {
            "same_keys": set(a) == set(b),
            "missing": sorted(set(a) ^ set(b))[:5],
            "bit_exact": all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a if k in b),
            "n_tensors": len(a),
            "files": sorted(p.name for p in back.iterdir()),
            "verify": convert.verify_against_hf(d, mc),
        }
    if os.environ.get("TP2_CKPT"):
        fam = os.environ.get("TP2_FAMILY", "qwen2")
        back = work / "hf_from_tp2"
        convert.megatron_to_hf(os.environ["TP2_CKPT"], back, progress=False, max_shard_bytes=40_000)
        a, b = _tensors(models[fam]), _tensors(back)
        res["tp2"] = {"same_keys": set(a) == set(b),
                      "bit_exact": all(torch.equal(a[k], b[k]) for k in a if k in b),
                      "files": sorted(p.name for p in back.iterdir())}
    # shape mismatch: a copy of the qwen3 model with a truncated k_proj
    bad = work / "bad"
    bad.mkdir(exist_ok=True)
    src = Path(models["qwen3"])
    t = _tensors(src)
    t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:-2].contiguous()
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    convert.copy_hf_side_files(src, bad)
    try:
        convert.hf_to_megatron(bad, work / "mc_bad", progress=False)
        res["shape_error"] = None
    except MappingError as e:
        res["shape_error"] = str(e)
    torch.save(res, os.environ["OUT"])


if __name__ == "__main__":
    main()
