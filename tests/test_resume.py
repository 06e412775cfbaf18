"""Kill-and-resume on CPU without Slurm (issue 7): SIGTERM mid-run → checkpoint at the step boundary →
exit 3 → ``resume=auto`` → the following steps' batches and losses equal an uninterrupted run's."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from conftest import REPO_ROOT
from helpers import (CONFIG, PY, bit_differences, checkpoint_contents, fail_message, repo_env, run_train,
                     shared_tiny_model)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The demo model, prepared once for the session's end-to-end modules (helpers.shared_tiny_model)."""
    return shared_tiny_model(tmp_path_factory)


def _steps(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


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
    err = open(tmp_path / "trainer.err", "w+")
    proc = subprocess.Popen([PY, "-m", "megatron_dapo.train", CONFIG, "run_name=o", f"output_dir={tmp_path}",
                             f"model.hf_path={tiny_model}", "trainer.total_steps=50"], cwd=REPO_ROOT, env=repo_env(),
                            stdout=subprocess.DEVNULL, stderr=err,
                            # a pytest started in the background (nohup, `&` in a script) ignores SIGINT and its
                            # children inherit that: Python then never raises KeyboardInterrupt. Ctrl-C at a
                            # terminal reaches a foreground trainer with the default disposition: restore it.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    children = psutil.Process(proc.pid).children(recursive=True)
    engines = [c for c in children if "megatron_dapo.engines.cpu.server" in " ".join(c.cmdline())]
    assert engines, "the trainer should have started a CPU engine"
    proc.send_signal(sig)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:  # a hang: every thread's stack (SIGQUIT, cli.cmd_train) into the message
        proc.send_signal(signal.SIGQUIT)
        time.sleep(3)
        proc.kill()
        err.seek(0)
        pytest.fail(f"the trainer did not exit within 120 s of {sig!r}; its stderr:\n{err.read()[-12000:]}")
    finally:
        err.close()
    gone, alive = psutil.wait_procs(engines, timeout=30)
    assert not alive, f"engine processes left behind after {sig!r}: {[p.pid for p in alive]}"


def test_trim_steps_log_drops_steps_after_the_resume_point(tmp_path):
    """A crash after steps 1..5 with the last checkpoint at step 3 (and a line cut short by the kill): the
    resumed run's log keeps steps 1..3 only, so each step is in it once after the run logs 4 and 5 again."""
    from megatron_dapo.trainer import trim_steps_log

    log = tmp_path / "steps.jsonl"
    assert trim_steps_log(log, 3) == 0 and not log.exists()
    log.write_text("".join(json.dumps({"step": s, "x": s / 2}) + "\n" for s in range(1, 6)) + '{"step": 6, "x"')
    assert trim_steps_log(log, 3) == 3
    assert [s["step"] for s in _steps(log)] == [1, 2, 3] and _steps(log)[2]["x"] == 1.5
    assert trim_steps_log(log, 3) == 0  # nothing past the resume point: the file is left as it is
    assert trim_steps_log(log, 0) == 3 and log.read_text() == ""  # no checkpoint: the run starts over
