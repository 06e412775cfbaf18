"""Kill-and-resume on CPU without Slurm (issue 7): SIGTERM mid-run → checkpoint at the step boundary →
exit 3 → ``resume=auto`` → the following steps' batches and losses equal an uninterrupted run's."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from helpers import CONFIG, PY, fail_message, repo_env, run_train


def _steps(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def checkpoint_contents(ckpt_dir: Path, scratch: Path) -> dict:
    """Everything a checkpoint directory stores, for a bit-for-bit comparison: the model and optimizer
    tensors of the torch_dist shards (via ``dcp_to_torch_save``), ``common.pt`` (LR scheduler,
    optimizer param groups) and ``trainer_state.json`` (step, data position, sampler state)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / f"{ckpt_dir.parent.parent.name}-{ckpt_dir.name}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))

    def flat(o, prefix):
        if isinstance(o, dict):
            for k, v in o.items():
                yield from flat(v, f"{prefix}/{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                yield from flat(v, f"{prefix}/{i}")
        else:
            yield prefix, o

    items = dict(flat(torch.load(out, weights_only=False), "shards"))
    items.update(flat(torch.load(ckpt_dir / "common.pt", weights_only=False), "common"))
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    # python_random is a record of the global `random` state at save time, which libraries consume
    # differently in a resumed process (nothing in training draws from it; training RNG states are
    # in rng/); it is the only trainer-state field left out
    state.pop("python_random", None)
    items.update(flat(state, "trainer_state"))
    return items


def bit_differences(a: dict, b: dict) -> list[str]:
    """Keys of two :func:`checkpoint_contents` whose values are not bit-identical."""
    import torch

    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape
                    and torch.equal(x, y)):
                bad.append(k)
        elif x != y:
            bad.append(k)
    return bad


@pytest.mark.slow
def test_sigterm_checkpoint_exit3_then_exact_resume(tmp_path, tiny_model):  # noqa: F811
    common = [f"model.hf_path={tiny_model}", f"output_dir={tmp_path}", "trainer.total_steps=4",
              "trainer.export_hf=false", "trainer.save_interval=0"]
    ref = run_train(common + ["run_name=ref"])
    assert ref.returncode == 0, fail_message(ref)
    reference = _steps(tmp_path / "ref" / "steps.jsonl")
    assert [s["step"] for s in reference] == [1, 2, 3, 4]

    log = tmp_path / "int" / "steps.jsonl"
    proc = subprocess.Popen([PY, "-m", "megatron_dapo.train", CONFIG, "run_name=int"] + common, cwd=REPO_ROOT,
                            env=repo_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    assert "exiting with 3" in out
    done = _steps(log)
    assert 1 <= len(done) < 4, done
    latest = (tmp_path / "int" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"iter_{len(done):07d}"
    # the resumed run keeps this checkpoint (save_interval=0, keep_last_checkpoints 2: it is pruned
    # only by a later periodic save), so it can be compared with the final one below

    resumed = run_train(common + ["run_name=int"])
    assert resumed.returncode == 0, fail_message(resumed)
    got = _steps(log)
    assert [s["step"] for s in got] == [1, 2, 3, 4]
    # every step after the resume trained on the batch the uninterrupted run had, with the same
    # rewards and the same losses, bit for bit (deterministic rollouts: examples/tiny-cpu/dapo.yaml)
    for a, b in zip(got, reference):
        for key in ("prompt_indices", "rollout/reward_mean", "actor/pg_loss", "actor/grad_norm"):
            assert a[key] == b[key], (key, a, b)
    # and the final weights, optimizer moments, LR scheduler and trainer state are bit-identical
    final_ref = checkpoint_contents(tmp_path / "ref" / "checkpoints" / "iter_0000004", tmp_path / "dcp")
    final_int = checkpoint_contents(tmp_path / "int" / "checkpoints" / "iter_0000004", tmp_path / "dcp")
    assert sum(k.startswith("shards/optimizer.state.exp_avg.") for k in final_ref) > 5
    assert any(k.startswith("common/opt_param_scheduler/") for k in final_ref)
    assert {"trainer_state/step", "trainer_state/prompt_skips"} <= set(final_ref)
    assert any(k.startswith("trainer_state/dataset/") for k in final_ref)
    assert any(k.startswith("trainer_state/sampler/") for k in final_ref)
    assert bit_differences(final_ref, final_int) == []
    # the weights did train: the checkpoint at the kill differs from the final one
    at_kill = checkpoint_contents(tmp_path / "int" / "checkpoints" / latest, tmp_path / "dcp")
    moved = [k for k in bit_differences(at_kill, final_int) if k.startswith("shards/decoder.")]
    assert len(moved) > 5, moved


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_no_orphan_engines_after_ctrl_c_or_kill(tmp_path, tiny_model, sig):  # noqa: F811
    import psutil

    log = tmp_path / "o" / "steps.jsonl"
    proc = subprocess.Popen([PY, "-m", "megatron_dapo.train", CONFIG, "run_name=o", f"output_dir={tmp_path}",
                             f"model.hf_path={tiny_model}", "trainer.total_steps=50"], cwd=REPO_ROOT, env=repo_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    children = psutil.Process(proc.pid).children(recursive=True)
    engines = [c for c in children if "megatron_dapo.engines.cpu.server" in " ".join(c.cmdline())]
    assert engines, "the trainer should have started a CPU engine"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    gone, alive = psutil.wait_procs(engines, timeout=30)
    assert not alive, f"engine processes left behind after {sig!r}: {[p.pid for p in alive]}"
