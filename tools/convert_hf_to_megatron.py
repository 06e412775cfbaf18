#!/usr/bin/env python
"""Convert a Hugging Face checkpoint (Qwen2/2.5, Llama 3, Qwen3, Qwen3-MoE) into a megatron-core torch_dist checkpoint.

    python tools/convert_hf_to_megatron.py --hf Qwen2.5-7B --out ckpt/qwen2.5-7b-mcore [--verify]
    torchrun --nproc_per_node=4 tools/convert_hf_to_megatron.py --hf ... --out ... --tp 2 --pp 2
    torchrun --nproc_per_node=2 tools/convert_hf_to_megatron.py --hf Qwen3-30B-A3B --out ... --ep 2

MoE models: ``--ep`` ranks each read and write only their experts (``--etp``: expert tensor parallelism,
default ``--tp``); the process count is then ``pp × lcm(tp, ep × etp)``.

The checkpoint is layout-agnostic (any TP/PP/VPP loads it); config.json and the tokenizer files are
copied into ``--out`` for the way back (tools/convert_megatron_to_hf.py). ``--verify`` reloads the
written checkpoint at TP=PP=1 and prints the max abs difference of logits and log-probs against
transformers on a fixed batch (fp32 models: expect ≤ 1e-5; exit code 1 above ``--tolerance``). Above it the
comparison is repeated in float64 (deep real models: fp32 rounding alone exceeds 1e-5, e.g. 7.7e-5 for
SmolLM2-135M); it then passes when fp64 agrees to 1e-9 and Megatron's fp32 error is at most twice
transformers' own.
Works from a checkout without installation.
"""
import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="output directory for the torch_dist checkpoint")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (world size must be tp*pp)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    p.add_argument("--etp", type=int, default=None, help="expert-tensor-parallel size (MoE; default: --tp)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--verify", action="store_true", help="compare logits with transformers after writing")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max abs log-prob difference for --verify")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    hf = Path(args.hf)
    if not (hf / "config.json").is_file():
        print(f"error: --hf {hf}: config.json not found", file=sys.stderr)
        return 2
    if not list(hf.glob("*.safetensors")):
        print(f"error: --hf {hf}: no *.safetensors files", file=sys.stderr)
        return 2
    for flag in ("tp", "pp", "ep", "etp"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            print(f"error: --{flag} {v}: must be >= 1", file=sys.stderr)
            return 2
    etp = args.tp if args.etp is None else args.etp
    need = args.pp * math.lcm(args.tp, args.ep * etp)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != need:
        print(f"error: --tp {args.tp} --pp {args.pp} --ep {args.ep} --etp {etp} need {need} processes "
              f"(pp x lcm(tp, ep x etp)), got {world}; launch with torchrun --nproc_per_node={need}", file=sys.stderr)
        return 2

    import torch.distributed as dist

    from megatron_dapo.models.convert import hf_to_megatron, report_verify, tool_errors, verify_against_hf

    try:
        out = hf_to_megatron(hf, args.out, tp=args.tp, pp=args.pp, divisible_by=args.make_vocab_size_divisible_by,
                             ep=args.ep, etp=args.etp)
        rank = dist.get_rank()
        if rank == 0:
            print(f"wrote Megatron torch_dist checkpoint to {out} (saved at TP={args.tp} PP={args.pp} EP={args.ep})")
        rc = 0
        if args.verify:
            diff = verify_against_hf(hf, out, fp64_if_above=args.tolerance)
            rc = report_verify(diff, args.tolerance) if rank == 0 else \
                (0 if diff["max_abs_logprobs"] <= args.tolerance else 1)
        return rc
    except tool_errors() as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
