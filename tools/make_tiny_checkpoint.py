#!/usr/bin/env python
"""Write a tiny random-initialised Hugging Face checkpoint (qwen2 / llama / qwen3) with a tokenizer.

Examples::

    python tools/make_tiny_checkpoint.py --out /tmp/tiny-qwen2
    python tools/make_tiny_checkpoint.py --out /tmp/tiny-llama --family llama --hidden-size 128
    python tools/make_tiny_checkpoint.py --out /tmp/tiny-q --tokenizer ../shared/data/qwen2.5-tokenizer
    python tools/make_tiny_checkpoint.py --out /tmp/tiny-demo --demo-data train.parquet

Without ``--tokenizer`` a demo byte-level BPE is trained on ``--demo-data`` (verl-schema rows) or on
freshly generated demo arithmetic rows.  See ``megatron_dapo/data/tiny_checkpoint.py``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Work from a plain checkout without installing the package.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from megatron_dapo.data.tiny_checkpoint import FAMILIES, make_tiny_checkpoint  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--family", choices=FAMILIES, default="qwen2")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer directory to copy (default: train the demo tokenizer)")
    p.add_argument("--demo-data", nargs="*", default=None,
                   help=".parquet/.jsonl rows to train the demo tokenizer on (default: generated demo rows)")
    p.add_argument("--demo-vocab-size", type=int, default=150)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-key-value-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--max-position-embeddings", type=int, default=512)
    p.add_argument("--initializer-range", type=float, default=0.02)
    p.add_argument("--vocab-size", type=int, default=None, help="embedding rows (default: len(tokenizer))")
    p.add_argument("--untie-word-embeddings", action="store_true", help="separate lm_head weights")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    demo_rows = None
    if args.demo_data:
        if args.tokenizer:
            raise SystemExit("--demo-data trains the demo tokenizer; it cannot be combined with --tokenizer")
        from megatron_dapo.data.dataset import load_rows

        demo_rows = load_rows(args.demo_data)
    out = make_tiny_checkpoint(
        args.out,
        family=args.family,
        tokenizer_dir=args.tokenizer,
        demo_rows=demo_rows,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        intermediate_size=args.intermediate_size,
        tie_word_embeddings=not args.untie_word_embeddings,
        seed=args.seed,
        max_position_embeddings=args.max_position_embeddings,
        initializer_range=args.initializer_range,
        vocab_size=args.vocab_size,
        demo_vocab_size=args.demo_vocab_size,
    )
    print(f"wrote {args.family} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
