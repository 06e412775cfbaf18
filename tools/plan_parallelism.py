#!/usr/bin/env python
"""Print Megatron parallel layouts (TP/PP/VPP/CP, MoE EP/ETP, token budget, recompute, offload) that fit in GPU memory.

Examples::

    python tools/plan_parallelism.py --hf-config /models/Qwen2.5-32B --nodes 16 --gpus-per-node 8 \
        --gpu-memory-gb 80 --max-prompt-length 2048 --max-response-length 20480 --colocated \
        --sglang-mem-fraction 0.6
    # MoE (num_experts in config.json): EP/ETP are enumerated and ranked too; --ep/--etp restrict them
    python tools/plan_parallelism.py --hf-config /models/Qwen3-30B-A3B --nodes 8 --colocated --sglang-tp 4 \
        --ep 4,8 --etp 1,tp --moe-token-dispatcher alltoall

The formulas, their sources and assumptions are in :mod:`megatron_dapo.launch.planner`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_dapo.launch.planner import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
