"""Training checkpoints of the Megatron actor (megatron_dapo.actor.checkpoint).

* exact resume: save → load (fresh process state, other seed, no HF weights) at the same layout, then the
  next ``train_step`` gives bit-identical parameters to the uninterrupted run (optimizer, LR scheduler
  and RNG states restored), also with the distributed optimizer at DP=2 in both of its formats;
* resharding: TP1 → TP2, TP2 → PP2, TP2×PP2 → TP1 give the same log-probs (≤ 1e-5), and with the
  regular optimizer the next Adam step's parameters agree to 1 % of the step size;
* the distributed optimizer's ``dp_reshardable`` state refuses another layout with CheckpointLayoutError
  (``load_optimizer=False`` loads the weights); its ``fully_reshardable`` state loads DP=2 → TP=2;
* a kill during save leaves the previous checkpoint loadable and ``latest`` on it; the leftover
  ``*.tmp-*`` directory is ignored and removed by the next save;
* ``latest_checkpoint`` / ``prune_checkpoints`` file logic (no processes).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_scripts.common import make_models, torchrun  # noqa: E402

from megatron_dapo.actor.checkpoint import (ITER_RE, iter_dir_name, latest_checkpoint,  # noqa: E402
                                            prune_checkpoints)


def _run(nproc, hf, steps, out, check=True):
    proc = torchrun("ckpt_worker.py", nproc, {"HF": hf, "STEPS": json.dumps(steps), "OUT": out}, check=check)
    return proc, (torch.load(out, weights_only=False) if Path(out).exists() else [])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    models = make_models(root / "models")
    hf = str(models["qwen2"])
    kill_root, c1, c2, c3, c4, c5 = (str(root / n) for n in ("kill", "c1", "c2", "c3", "c4", "c5"))
    res = {}
    proc, res["kill"] = _run(1, hf, [{"op": "kill_save", "ckpt": kill_root, "at": "before_rename"}],
                             str(root / "kill.pt"), check=False)
    res["kill_rc"] = proc.returncode
    res["kill_ref"] = torch.load(str(root / "kill.pt") + ".ref", weights_only=False)
    res["kill_latest_after_kill"] = latest_checkpoint(kill_root)
    res["kill_tmp_after_kill"] = sorted(p.name for p in Path(kill_root).glob("iter_*.tmp-*"))
    _, res["one"] = _run(1, hf, [
        {"op": "load", "ckpt": kill_root, "load_optimizer": 1, "snapshot": 1},
        {"op": "save", "ckpt": kill_root, "step": 3},
        {"op": "save", "ckpt": c1, "step": 1},
        {"op": "load", "ckpt": c1}], str(root / "one.pt"))
    res["kill_tmp_after_save"] = sorted(p.name for p in Path(kill_root).glob("iter_*.tmp-*"))
    res["kill_latest_after_save"] = latest_checkpoint(kill_root)
    _, res["two"] = _run(2, hf, [
        {"op": "load", "ckpt": c1, "tp": 2},
        {"op": "save", "ckpt": c2, "tp": 2},
        {"op": "load", "ckpt": c2, "pp": 2},
        {"op": "save", "ckpt": c4, "distopt": 1},
        {"op": "load", "ckpt": c4, "distopt": 1},
        {"op": "layout_error", "ckpt": c4, "distopt": 1, "tp": 2},
        {"op": "load", "ckpt": c4, "distopt": 1, "tp": 2, "load_optimizer": 0},
        {"op": "save", "ckpt": c5, "distopt": 1, "fmt": "fully_reshardable"},
        {"op": "load", "ckpt": c5, "distopt": 1},
        {"op": "load", "ckpt": c5, "distopt": 1, "tp": 2}], str(root / "two.pt"))
    _, res["four"] = _run(4, hf, [
        {"op": "save", "ckpt": c3, "tp": 2, "pp": 2},
        {"op": "load", "ckpt": c3}], str(root / "four.pt"))
    return res


# Across layouts gradients differ by fp32 round-off; Adam's m / sqrt(v) amplifies it for near-zero
# gradients, so the next step's parameters agree to a small fraction of the step size lr = 1e-2.
NEXT_STEP_TOL = 1e-4


def _assert_stepped(*results):
    """The "next step" each result compares really moved the parameters (an optimizer step happened)."""
    for r in results:
        before, after = r["params_before_next"], r["params_next"]
        changed = [k for k in after if not torch.equal(before[k], after[k])]
        assert len(changed) >= len(after) // 2, f"next step changed only {changed}"


def _max_param_diff(a, b):
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(runs):
    """A real kill (os._exit mid-save): the previous checkpoint loads, tensor by tensor identical."""
    from dist_scripts.ckpt_kill_worker import diff

    assert runs["kill_rc"] != 0
    assert runs["kill_latest_after_kill"].name == "iter_0000001"
    assert len(runs["kill_tmp_after_kill"]) == 1
    loaded = runs["one"][0]
    assert loaded["trainer_state"] == {"step": 1}
    ref = runs["kill_ref"]
    assert sum(k.startswith("model/") for k in ref) > 10 and any(k.startswith("optimizer/state/") for k in ref)
    assert diff(ref, loaded["state"]) == []
    # next save cleaned the stale tmp dir and moved latest
    assert runs["kill_tmp_after_save"] == []
    assert runs["kill_latest_after_save"].name == "iter_0000003"


@pytest.mark.slow
def test_kill_at_every_point_loads_previous_checkpoint(tmp_path):
    """The disk state a crash leaves at each of checkpoint.KILL_POINTS (copied there by the test-only
    hook): the checkpoint that loads is the previous complete one, compared tensor by tensor (model,
    every optimizer state tensor, LR scheduler, trainer state); see dist_scripts/ckpt_kill_worker.py."""
    from megatron_dapo.actor.checkpoint import KILL_POINTS

    models = make_models(tmp_path / "models")
    (tmp_path / "run").mkdir()
    torchrun("ckpt_kill_worker.py", 1, {"HF": str(models["qwen2"]), "ROOT": str(tmp_path / "run"),
                                        "OUT": str(tmp_path / "report.json")})
    rep = json.loads((tmp_path / "report.json").read_text())
    assert len(rep["params_changed_by_step"]) > 10  # the step between the two saves really trained
    want = {f"a/{p}" for p in KILL_POINTS if p != "after_old_moved_aside"} | {f"b/{p}" for p in KILL_POINTS}
    assert set(rep["points"]) == want
    for key, r in rep["points"].items():
        assert r["trainer_state"] == {"step": r["expected_step"]}, (key, r)
        assert r["compared"] > 100 and r["mismatched"] == [], (key, r)
        assert r["mismatched_other"] > 10, (key, r)  # the other candidate state really differs
        assert r["latest"].startswith(f"iter_{r['expected_step']:07d}"), (key, r)
    assert rep["points"]["b/after_old_moved_aside"]["latest"].startswith("iter_0000002.tmp-old-")
    # the next save after that crash restored the moved-aside checkpoint and cleaned up
    assert rep["b_after_next_save"] == ["iter_0000001", "iter_0000002", "iter_0000003", "latest"]
    # control: an uninterrupted save loads the new state, and it differs from the previous one
    assert rep["control"]["trainer_state"] == {"step": 2}
    assert rep["control"]["mismatched_vs_new"] == [] and rep["control"]["mismatched_vs_old"] > 10


@pytest.mark.slow
def test_exact_resume_same_layout(runs):
    save, load = runs["one"][2], runs["one"][3]
    _assert_stepped(save, load)
    assert load["trainer_state"] == {"step": 1, "data_pos": 17}
    assert torch.equal(save["logprobs"], load["logprobs"])
    assert save["lr_next"] == load["lr_next"]
    for k in save["params_next"]:
        assert torch.equal(save["params_next"][k], load["params_next"][k]), k
    assert torch.equal(save["rng_next"], load["rng_next"])


@pytest.mark.slow
def test_distributed_optimizer_resume_weights(runs):
    save, load = runs["two"][3], runs["two"][4]
    assert load["trainer_state"] == {"step": 1, "data_pos": 17}
    assert torch.equal(save["logprobs"], load["logprobs"])
    assert save["lr_next"] == load["lr_next"]


@pytest.mark.slow
@pytest.mark.parametrize("save_i,load_i", [(3, 4), (7, 8)], ids=["dp_reshardable", "fully_reshardable"])
def test_exact_resume_distributed_optimizer(runs, save_i, load_i):
    # regression: megatron-core 0.16.1 shares one Adam 'step' tensor across all parameters after a load
    # (torch Adam then advanced it once per parameter: next-step params were off by ~3e-3)
    save, load = runs["two"][save_i], runs["two"][load_i]
    _assert_stepped(save, load)
    assert torch.equal(save["logprobs"], load["logprobs"])
    for k in save["params_next"]:
        assert torch.equal(save["params_next"][k], load["params_next"][k]), k


@pytest.mark.slow
def test_distributed_optimizer_fully_reshardable_other_layout(runs):
    # saved at DP=2 with the distributed optimizer, loaded at TP=2 (DP=1): Adam moments resharded
    save, load = runs["two"][7], runs["two"][9]
    _assert_stepped(save, load)
    assert (save["logprobs"] - load["logprobs"]).abs().max() <= 1e-5
    assert save["lr_next"] == load["lr_next"]
    assert _max_param_diff(save["params_next"], load["params_next"]) <= NEXT_STEP_TOL


@pytest.mark.slow
def test_reshard_tp1_to_tp2(runs):
    save, load = runs["one"][2], runs["two"][0]
    _assert_stepped(save, load)
    assert (save["logprobs"] - load["logprobs"]).abs().max() <= 1e-5
    assert _max_param_diff(save["params_next"], load["params_next"]) <= NEXT_STEP_TOL


@pytest.mark.slow
def test_reshard_tp2_to_pp2(runs):
    save, load = runs["two"][1], runs["two"][2]
    assert (save["logprobs"] - load["logprobs"]).abs().max() <= 1e-5
    assert _max_param_diff(save["params_next"], load["params_next"]) <= NEXT_STEP_TOL


@pytest.mark.slow
def test_reshard_tp2pp2_to_tp1(runs):
    save, load = runs["four"][0], runs["four"][1]
    assert (save["logprobs"] - load["logprobs"]).abs().max() <= 1e-5
    assert _max_param_diff(save["params_next"], load["params_next"]) <= NEXT_STEP_TOL


@pytest.mark.slow
def test_distributed_optimizer_other_layout(runs):
    err = runs["two"][5]["error"]
    assert err is not None and "load_optimizer=False" in err and "TP=1" in err
    weights_only = runs["two"][6]
    assert (weights_only["logprobs"] - runs["two"][3]["logprobs"]).abs().max() <= 1e-5


def _fake_ckpt(root: Path, step: int, complete: bool = True) -> Path:
    d = root / iter_dir_name(step)
    d.mkdir(parents=True)
    if complete:
        (d / "metadata.json").write_text("{}")
        (d / "trainer_state.json").write_text("{}")
    return d


def test_latest_and_prune(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for s in (1, 2, 3, 4):
        _fake_ckpt(tmp_path, s)
    _fake_ckpt(tmp_path, 5, complete=False)
    (tmp_path / "iter_0000006.tmp-abc").mkdir()
    # no latest file: highest complete one
    assert latest_checkpoint(tmp_path).name == "iter_0000004"
    (tmp_path / "latest").write_text("iter_0000002\n")
    assert latest_checkpoint(tmp_path).name == "iter_0000002"
    (tmp_path / "latest").write_text("iter_0000005\n")  # incomplete -> fallback
    assert latest_checkpoint(tmp_path).name == "iter_0000004"
    (tmp_path / "latest").write_text("iter_0000003\n")
    removed = prune_checkpoints(tmp_path, keep_last=2)
    left = sorted(p.name for p in tmp_path.iterdir() if ITER_RE.match(p.name))
    assert "iter_0000003" in left and "iter_0000005" in left and "iter_0000001" not in left
    assert not list(tmp_path.glob("*.tmp-*"))
    assert any(p.name == "iter_0000006.tmp-abc" for p in removed)
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(tmp_path, 0)
    with pytest.raises(ValueError, match="step"):
        iter_dir_name(-1)
