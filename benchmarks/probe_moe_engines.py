"""Can a rollout engine serve Qwen3-MoE on CPU and take MoE weight pushes? One run per engine kind.

Run: ``MEGATRON_DAPO_ENGINE_VENV_ROOT=/path/with/venvs .venv/bin/python benchmarks/probe_moe_engines.py
--engines cpu,sglang,vllm`` (``make engines`` builds ``.venv-sglang`` / ``.venv-vllm``).

Every engine is started (one after another, one OpenMP thread) from the same tiny random fp32 Qwen3-MoE
(``tests/dist_scripts/moe_common.py`` ``make_engine_moe``: 3 layers, 4 experts, top-2, head size 32, the demo
tokenizer; every layer MoE unless ``--mlp-only-layers``). ``tests/moe_engines.py`` ``probe`` then compares the
engine's prompt log-probs of 4 fixed sequences with transformers' fp32 ones at start, after a push of the unchanged
checkpoint, and after a push of scaled per-expert HF tensors over each weight transport its backend speaks
(:data:`megatron_dapo.engines.engine_set.BACKENDS`, through :class:`megatron_dapo.sync.WeightSync`).

Prints one ``RESULT {json}`` line per engine kind (the dictionary ``probe`` returns; ``error`` holds the exception of
a failed start or push and the engine log's last error lines: what ``benchmarks/RESULTS.md`` quotes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="cpu,sglang,vllm", help="comma-separated kinds: cpu, sglang, vllm")
    ap.add_argument("--keep", default=None, help="scratch directory to keep (default: a temporary one)")
    ap.add_argument("--mlp-only-layers", default="", help="comma-separated dense layers (default none: every layer "
                    "MoE, the published Qwen3-MoE layout); e.g. 1 for the layout of tests/test_moe_parity.py")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from dist_scripts.moe_common import make_engine_moe
    from moe_engines import probe
    from engine_fixtures import make_protocol_model

    scratch = Path(args.keep or tempfile.mkdtemp(prefix="probe_moe_"))
    scratch.mkdir(parents=True, exist_ok=True)
    dense = [int(x) for x in args.mlp_only_layers.split(",") if x.strip()]
    model = make_engine_moe(scratch / "moe", make_protocol_model(scratch / "tokenizer_model"), mlp_only_layers=dense)
    for kind in [k.strip() for k in args.engines.split(",") if k.strip()]:
        print("RESULT " + json.dumps(probe(kind, model, scratch)), flush=True)
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
