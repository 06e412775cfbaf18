"""torchrun worker (nproc=1) for tests/test_actor_checkpoint.py::test_kill_at_every_point_loads_previous_checkpoint.

One actor trains a step and saves ``iter_1`` (two steps and ``iter_1``, ``iter_2`` for the same-step
re-save scenario); its full state right after that save (model parameters, every optimizer state
tensor, the LR scheduler state) is the reference. It trains one more step (the parameters must
change). Then a save into a copy of the root runs with the test-only hook
``MEGATRON_DAPO_CKPT_KILL_AT=copy:<dir>`` armed, which copies the root at every point of
``checkpoint.KILL_POINTS``: the disk state a crash (kill -9) there leaves. (A real ``os._exit`` at
one point is tested by ckpt_worker's ``kill_save``; forking a child per point is not possible: gloo
collectives hang in a forked child.) A second actor (other seed, no HF weights) loads each copy's
latest checkpoint; its state must equal the reference tensor by tensor, and the trainer state must
be the previous one. Control: a save that is not interrupted loads the new state (so the
comparison can tell the two apart).

Writes a JSON report to ``OUT``.
"""
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def flat_tensors(obj, prefix=""):
    """{path: tensor or scalar} of a nested state dict (lists/dicts), for exact comparison."""
    import torch

    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}/{i}"))
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().clone()
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        out[prefix] = obj
    return out


def snapshot(actor):
    model = {f"model/{n}": t.detach().clone() for n, t in actor.iter_hf_tensors()}
    opt = flat_tensors(actor.optimizer.state_dict(), "optimizer")
    sched = flat_tensors(actor.scheduler.state_dict(), "scheduler")
    return {**model, **opt, **sched}


def diff(a, b):
    """Keys whose values are not bit-identical (or present on one side only)."""
    import torch

    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and x.shape == y.shape and torch.equal(x, y)):
                bad.append(k)
        elif x != y:
            bad.append(k)
    return bad


def main():
    import torch
    import torch.distributed as dist

    from ckpt_worker import build, make_batch
    from megatron_dapo.actor import checkpoint as ck
    from megatron_dapo.actor.megatron_actor import LossSettings

    b, ls = make_batch(), LossSettings()
    base = Path(os.environ["ROOT"])
    report = {"points": {}}
    writer = build({}, load_weights=True)
    loader = build({}, load_weights=False)

    def crashed_saves(src, step, tag):
        """Copy ``src``, save ``step`` into the copy with the copy hook armed: the disk state a
        crash at each kill point leaves, as ``<base>/<tag>-points/<point>``."""
        root, points = base / f"{tag}-save", base / f"{tag}-points"
        shutil.copytree(src, root)
        os.environ["MEGATRON_DAPO_CKPT_KILL_AT"] = f"copy:{points}"
        try:
            ck.save_checkpoint(writer, root, step, {"step": step})
        finally:
            del os.environ["MEGATRON_DAPO_CKPT_KILL_AT"]
        return {p.name: p for p in points.iterdir()}

    # scenario A: iter_1 complete and latest; the save of step 2 crashes
    writer.train_step(b, ls)
    root_a = base / "a"
    ck.save_checkpoint(writer, root_a, 1, {"step": 1})
    ref_a = snapshot(writer)
    writer.train_step(b, ls)
    after = snapshot(writer)
    report["params_changed_by_step"] = [k for k in ref_a if k.startswith("model/")
                                        and not torch.equal(ref_a[k], after[k])]
    crashed = {"a": crashed_saves(root_a, 2, "a")}
    # scenario B: iter_1 and iter_2 (latest) complete; a re-save of step 2 crashes (the only way to
    # reach after_old_moved_aside)
    root_b = base / "b"
    ck.save_checkpoint(writer, root_b, 1, {"step": 1})
    ck.save_checkpoint(writer, root_b, 2, {"step": 2})
    ref_b = snapshot(writer)
    writer.train_step(b, ls)
    new_b = snapshot(writer)
    crashed["b"] = crashed_saves(root_b, 2, "b")
    for tag, ref, prev in (("a", ref_a, 1), ("b", ref_b, 2)):
        for point, root in sorted(crashed[tag].items()):
            latest = ck.latest_checkpoint(root)
            state = ck.load_checkpoint(loader, root)
            got = snapshot(loader)
            # re-saving step 2 (scenario B): once the new iter_2 has taken the name it is the newest
            # complete checkpoint, and `latest` already names it
            new = tag == "b" and point in ("before_latest", "before_latest_replace")
            report["points"][f"{tag}/{point}"] = {
                "latest": latest.name if latest else None, "trainer_state": state, "expected_step": prev,
                "expect_new": new, "mismatched": diff(new_b if new else ref, got)[:20],
                "mismatched_other": len(diff(ref if new else new_b if tag == "b" else after, got)),
                "compared": len(ref)}
        # the next save after the crash at the worst point cleans up and moves latest on
        if tag == "b":
            root = crashed[tag]["after_old_moved_aside"]
            ck.save_checkpoint(writer, root, 3, {"step": 3})
            report["b_after_next_save"] = sorted(p.name for p in root.iterdir())
    # control: an uninterrupted save loads the writer's current state, not the reference
    root = base / "control"
    shutil.copytree(root_a, root)
    ck.save_checkpoint(writer, root, 2, {"step": 2})
    state = ck.load_checkpoint(loader, root)
    now = snapshot(writer)
    got = snapshot(loader)
    report["control"] = {"trainer_state": state, "mismatched_vs_new": diff(now, got)[:20],
                         "mismatched_vs_old": len(diff(ref_a, got))}
    writer.close()
    loader.close()
    Path(os.environ["OUT"]).write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
