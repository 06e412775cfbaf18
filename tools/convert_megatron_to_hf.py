#!/usr/bin/env python
"""Export a megatron-core torch_dist checkpoint (converted or a training iter_* directory) to HF safetensors.

    python tools/convert_megatron_to_hf.py --ckpt ckpt/qwen2.5-7b-mcore --out hf-out [--verify]
    python tools/convert_megatron_to_hf.py --ckpt outputs/run/checkpoints/iter_0000100 --hf-config Qwen2.5-7B --out hf

Runs in one process (any saved TP/PP layout is resharded to TP=PP=1 on load) and writes
model.safetensors (or sharded files + index), config.json, generation_config.json and tokenizer files.
``--verify`` compares transformers on the written directory with Megatron on the checkpoint (max abs
logits / log-probs difference on a fixed batch; exit code 1 above ``--tolerance``).
Works from a checkout without installation.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="Megatron torch_dist checkpoint directory (has metadata.json); "
                   "a checkpoint root with a 'latest' file is accepted too")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--hf-config", default=None, help="HF directory with config.json/tokenizer when --ckpt has none")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="max safetensors file size")
    p.add_argument("--verify", action="store_true", help="compare logits of the written model with Megatron's")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max abs log-prob difference for --verify")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt = Path(args.ckpt)
    if not ckpt.is_dir():
        print(f"error: --ckpt {ckpt}: directory not found", file=sys.stderr)
        return 2
    if not (ckpt / "metadata.json").is_file():
        from megatron_dapo.actor.checkpoint import latest_checkpoint

        found = latest_checkpoint(ckpt)
        if found is None:
            print(f"error: --ckpt {ckpt}: no metadata.json (not a torch_dist checkpoint) and no complete "
                  f"iter_* checkpoint under it", file=sys.stderr)
            return 2
        ckpt = found

    import torch.distributed as dist

    from megatron_dapo.models.convert import (compare_logits, fixed_batch, hf_logits, load_megatron_model,
                                              megatron_logits, megatron_model, megatron_to_hf, report_verify,
                                              tool_errors)
    from megatron_dapo.models.hf_config import spec_from_hf_config

    try:
        out = megatron_to_hf(ckpt, args.out, hf_config_dir=args.hf_config,
                             max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
        print(f"wrote HF checkpoint to {out}")
        if not args.verify:
            return 0
        spec = spec_from_hf_config(out)
        tokens = fixed_batch(spec.vocab_size)
        with megatron_model(spec) as mm:
            load_megatron_model(mm["model"], ckpt)
            meg = megatron_logits(mm["model"], tokens, 1, spec.vocab_size)
        diff = compare_logits(meg, hf_logits(out, tokens))
        return report_verify(diff, args.tolerance)
    except tool_errors() as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
