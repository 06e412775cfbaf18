"""The LR schedule counts rollout steps (issue 12): ``actor.lr_warmup_steps`` is a number of rollout steps,
the LR is constant within a step whatever the number of optimizer updates, and it advances once per step.

One torchrun process builds a tiny :class:`MegatronActor` (warm-up 3 rollout steps, 6 steps in all) and runs
4 optimizer updates per rollout step, as the trainer does: ``set_lr_step(step)`` then the mini-batches.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

LR = 1e-2
WARMUP, STEPS, UPDATES = 3, 6, 4


def _expected(style: str) -> list[float]:
    """The schedule written out: warm-up lr*(s+1)/W for s < W, then decay ratio (s - W) / (T - W)."""
    out = []
    for s in range(STEPS):
        if s < WARMUP:
            out.append(LR * (s + 1) / WARMUP)
        elif style == "constant":
            out.append(LR)
        else:  # linear towards min_lr = 0
            out.append(LR * (1 - (s - WARMUP) / (STEPS - WARMUP)))
    return out


@pytest.fixture(scope="module")
def lr_results(tmp_path_factory):
    from dist_scripts.common import torchrun

    from megatron_dapo.data.tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("lr")
    hf = root / "qwen2"
    make_tiny_checkpoint(hf, family="qwen2", num_layers=1, vocab_size=300, seed=0)
    out = root / "lrs.json"
    torchrun(str(Path(__file__).resolve()), 1, {"HF": str(hf), "OUT": str(out)})
    return json.loads(out.read_text())


@pytest.mark.parametrize("style", ["constant", "linear"])
def test_lr_per_rollout_step_with_4_updates_per_step(lr_results, style):
    got = lr_results[style]
    want = _expected(style)
    assert want[:3] == pytest.approx([LR / 3, 2 * LR / 3, LR], rel=1e-12)  # warm-up ends at step W - 1
    assert len(got["per_update"]) == STEPS
    for s in range(STEPS):
        # set_lr_step's value is what every one of the 4 updates of the step used
        assert got["set"][s] == pytest.approx(want[s], rel=1e-12, abs=1e-15), (s, got["set"], want)
        assert got["per_update"][s] == pytest.approx([want[s]] * UPDATES, rel=1e-12, abs=1e-15), (s, got)
    # the scheduler position is absolute: going back to a step gives its LR again (exact resume)
    assert got["again_step1"] == pytest.approx(want[1], rel=1e-12)


def test_negative_step_refused(lr_results):
    assert "rollout step must be >= 0" in lr_results["negative"]


# ---------------------------------------------------------------------------------------------- worker
def _worker_main():
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dist_scripts.ckpt_worker import make_batch

    from megatron_dapo.actor.megatron_actor import LossSettings, MegatronActor
    from megatron_dapo.config import ActorConfig

    res = {}
    for style in ("constant", "linear"):
        cfg = ActorConfig(lr=LR, min_lr=0.0, lr_warmup_steps=WARMUP, lr_decay_style=style, max_tokens_per_gpu=64,
                          weight_decay=0.0)
        actor = MegatronActor(os.environ["HF"], cfg, total_train_steps=STEPS, seed=1234)
        batch, loss = make_batch(), LossSettings()
        r = {"set": [], "per_update": []}
        for step in range(STEPS):
            r["set"].append(actor.set_lr_step(step))
            r["per_update"].append([actor.train_step(batch, loss)["lr"] for _ in range(UPDATES)])
        r["again_step1"] = actor.set_lr_step(1)
        res[style] = r
        if style == "linear":
            try:
                actor.set_lr_step(-1)
                res["negative"] = "no error"
            except ValueError as e:
                res["negative"] = str(e)
        actor.close()
    Path(os.environ["OUT"]).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    _worker_main()
