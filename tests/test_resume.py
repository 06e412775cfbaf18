"""Kill-and-resume on CPU without Slurm (issue 7): SIGTERM mid-run → checkpoint at the step boundary →
exit 3 → ``resume=auto`` → the following steps' batches and losses equal an uninterrupted run's."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from conftest import REPO_ROOT
from test_e2e import CONFIG, PY, _env, _fail, run_train, tiny_model  # noqa: F401  (fixture)


def _steps(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_checkpoint_exit3_then_exact_resume(tmp_path, tiny_model):  # noqa: F811
    common = [f"model.hf_path={tiny_model}", f"output_dir={tmp_path}", "trainer.total_steps=4",
              "trainer.export_hf=false", "trainer.save_interval=0"]
    ref = run_train(common + ["run_name=ref"])
    assert ref.returncode == 0, _fail(ref)
    reference = _steps(tmp_path / "ref" / "steps.jsonl")
    assert [s["step"] for s in reference] == [1, 2, 3, 4]

    log = tmp_path / "int" / "steps.jsonl"
    proc = subprocess.Popen([PY, "-m", "megatron_dapo.train", CONFIG, "run_name=int"] + common, cwd=REPO_ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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

    resumed = run_train(common + ["run_name=int"])
    assert resumed.returncode == 0, _fail(resumed)
    got = _steps(log)
    assert [s["step"] for s in got] == [1, 2, 3, 4]
    for a, b in zip(got, reference):
        assert a["prompt_indices"] == b["prompt_indices"], (a, b)
        assert a["rollout/reward_mean"] == b["rollout/reward_mean"], (a, b)
        assert abs(a["actor/pg_loss"] - b["actor/pg_loss"]) <= 1e-6 * max(1.0, abs(b["actor/pg_loss"])), (a, b)
        assert abs(a["actor/grad_norm"] - b["actor/grad_norm"]) <= 1e-6 * max(1.0, b["actor/grad_norm"]), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_no_orphan_engines_after_ctrl_c_or_kill(tmp_path, tiny_model, sig):  # noqa: F811
    import psutil

    log = tmp_path / "o" / "steps.jsonl"
    proc = subprocess.Popen([PY, "-m", "megatron_dapo.train", CONFIG, "run_name=o", f"output_dir={tmp_path}",
                             f"model.hf_path={tiny_model}", "trainer.total_steps=50"], cwd=REPO_ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    children = psutil.Process(proc.pid).children(recursive=True)
    engines = [c for c in children if "cpu_engine" in " ".join(c.cmdline())]
    assert engines, "the trainer should have started a CPU engine"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    gone, alive = psutil.wait_procs(engines, timeout=30)
    assert not alive, f"engine processes left behind after {sig!r}: {[p.pid for p in alive]}"
