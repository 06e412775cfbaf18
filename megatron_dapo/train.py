"""``python -m megatron_dapo.train CONFIG [key=value ...]``: same as ``megatron-dapo train`` (torchrun-friendly)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["train"] + sys.argv[1:]))
