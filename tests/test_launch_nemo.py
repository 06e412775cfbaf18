"""megatron_dapo.launch.nemo: the launch plan, its sbatch rendering, the nemo-run dry run, and a real
nemo-run submission of the CPU smoke job to the local Slurm cluster (skipped without one)."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SLURM_START, require
from megatron_dapo.launch.nemo import LaunchError, build_launch_plan, main, render_dry_run

CFG = "examples/qwen2.5-7b/dapo.yaml"


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)


def test_plan_colocated():
    p = build_launch_plan(CFG, ["trainer.total_steps=3"], nodes=2, gpus_per_node=8, partition="gpu")
    cmd = p.sbatch_command()
    assert cmd[0] == "sbatch" and cmd[-3:] == ["slurm/dapo.sbatch", CFG, "trainer.total_steps=3"]
    for opt in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue", "--signal=B:USR1@900",
                "--partition=gpu"):
        assert opt in cmd
    assert p.env["DAPO_ROOT"] == str(REPO_ROOT)
    text = render_dry_run(p)
    assert "DAPO_GPUS_PER_NODE=8" in text and "slurm/dapo.sbatch" in text


def test_plan_modes_and_errors():
    d = build_launch_plan(CFG, [], nodes=4, mode="disaggregated", rollout_nodes=1)
    assert d.script == "slurm/dapo_disaggregated.sbatch" and d.env["DAPO_ROLLOUT_NODES"] == "1"
    c = build_launch_plan(CFG, [], nodes=2, mode="cpu-smoke", container_image="img:1", container_mounts=["/a:/a"])
    assert c.gpus_per_node == 0 and not any(o.startswith("--gpus") for o in c.sbatch_options)
    assert c.env["DAPO_CONTAINER_IMAGE"] == "img:1" and c.env["DAPO_CONTAINER_MOUNTS"] == "/a:/a"
    for kwargs, match in [(dict(mode="x"), "--mode"), (dict(nodes=0), "--nodes"),
                          (dict(nodes=1, mode="disaggregated"), "disaggregated"),
                          (dict(nodes=3, mode="disaggregated", rollout_nodes=3), "--rollout-nodes")]:
        with pytest.raises(LaunchError, match=match):
            build_launch_plan(CFG, [], **kwargs)
    with pytest.raises(LaunchError, match="config file not found"):
        build_launch_plan("missing.yaml")
    with pytest.raises(LaunchError, match="key=value"):
        build_launch_plan(CFG, ["not-an-override"])
    with pytest.raises(LaunchError, match="backend"):
        render_dry_run(d, backend="k8s")


def test_cli_dry_run(capsys):
    assert main([CFG, "seed=1", "--nodes", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sbatch" in out and "--nodes=2" in out and "seed=1" in out
    assert main(["missing.yaml", "--dry-run"]) == 2


@functools.lru_cache(maxsize=1)
def _probe():
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "sbatch not installed"
    env = dict(os.environ)
    conf = Path("/tmp/local-slurm/etc/slurm.conf")
    if "SLURM_CONF" not in env and conf.exists():
        env["SLURM_CONF"] = str(conf)
    if not Path(env.get("SLURM_CONF", "/etc/slurm/slurm.conf")).exists():
        return "no Slurm config"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%D %G"], capture_output=True, text=True, env=env, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if r.returncode != 0 or "gpu" not in r.stdout:
        return "no Slurm cluster with GPU nodes reachable"
    return env


def _slurm_env():
    probe = _probe()
    require(not isinstance(probe, str), f"Slurm cluster with GPU nodes ({probe})", SLURM_START)
    return dict(probe)


def test_plan_sbatch_test_only():
    env = _slurm_env()
    p = build_launch_plan(CFG, ["trainer.total_steps=1"], nodes=1)
    cmd = p.sbatch_command()
    r = subprocess.run([cmd[0], "--test-only", *cmd[1:]], cwd=p.repo, env={**env, **p.env},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "to start at" in r.stderr, r.stderr


def test_nemo_run_dry_run_is_equivalent(tmp_path):
    # Separate process: nemo-run's local tunnel (invoke) reads stdin, which pytest captures.
    r = subprocess.run([sys.executable, "-m", "megatron_dapo.launch.nemo", CFG,
                        "trainer.total_steps=3", "--nodes", "2", "--time", "02:00:00", "--backend", "nemo",
                        "--dry-run"], cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       env={**os.environ, "NEMORUN_HOME": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    script = r.stdout[r.stdout.index("#!/bin/bash"):]
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(.*))?$", script, flags=re.M))
    assert directives["nodes"] == "2" and directives["ntasks-per-node"] == "8"
    assert directives["gpus-per-node"] == "8" and directives["time"] == "02:00:00"
    assert directives["signal"] == "B:USR1@900" and "requeue" in directives
    assert directives["job-name"] == "dapo"
    # the job body is the same batch script with the same arguments
    assert f"exec bash {REPO_ROOT}/slurm/dapo.sbatch {CFG} trainer.total_steps=3" in script
    assert f"export DAPO_ROOT={REPO_ROOT}" in script
    # and Slurm accepts the generated script
    env = _slurm_env()
    path = tmp_path / "nemo_sbatch.sh"
    path.write_text(script)
    r = subprocess.run(["sbatch", "--test-only", str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "to start at" in r.stderr, r.stderr


NEMO_DRIVER = """
import json, sys
from megatron_dapo.launch.nemo import build_launch_plan, launch
a = json.loads(sys.argv[1])
plan = build_launch_plan("examples/tiny-cpu/dapo.yaml", a["overrides"], nodes=2, mode="cpu-smoke", time="00:20:00",
                         job_name=a["name"], signal_seconds=60, extra_env={"DAPO_LOG_DIR": a["log_dir"]})
print("EXPERIMENT", launch(plan, "nemo"), flush=True)
"""


@pytest.mark.slow
def test_nemo_run_submits_cpu_smoke_job(tmp_path):
    """`launch(plan, backend="nemo")` for the CPU smoke job: nemo-run's SlurmExecutor (LocalTunnel, job dir
    under $NEMORUN_HOME/experiments, plain Packager) submits it to the cluster; the job runs
    slurm/cpu_smoke.sbatch (engine + TP=2 trainer on 2 nodes) for one step and completes."""
    from slurm_helpers import diagnose, sacct_history, slurm_env, wait_job_done

    env = slurm_env()
    name = f"dapo-nemo-{uuid.uuid4().hex[:8]}"  # unique: the test finds its job by name
    home = tmp_path / "nemo_home"
    args = {"name": name, "log_dir": str(tmp_path / "logs"),
            "overrides": ["trainer.total_steps=1", "run_name=nemo", f"output_dir={tmp_path / 'out'}",
                          f"model.hf_path={tmp_path / 'model'}"]}
    # separate process: nemo-run's local tunnel (invoke) reads stdin, which pytest captures
    r = subprocess.run([sys.executable, "-c", NEMO_DRIVER, json.dumps(args)], cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120,
                       env={**env, "NEMORUN_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)})
    assert r.returncode == 0 and "EXPERIMENT" in r.stdout, r.stderr[-3000:] + r.stdout[-3000:]
    exp_id = r.stdout.split("EXPERIMENT", 1)[1].split()[0]
    exp_dir = home / "experiments" / name / exp_id
    q = subprocess.run(["squeue", "-h", "-t", "all", f"--name={name}", "-o", "%i"], capture_output=True, text=True,
                       env=env, timeout=30)
    jobs = q.stdout.split()
    assert len(jobs) == 1, (q.stdout, q.stderr)
    job = jobs[0]
    try:
        final = wait_job_done(env, job, timeout=240)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
    log_file = exp_dir / name / f"sbatch_{name}_{job}.out"
    report = diagnose(log_file, tmp_path / "logs" / job)
    assert final.get("JobState") == "COMPLETED" and final.get("ExitCode") == "0:0", (final, report)

    # nemo-run's batch script: our resources, requeue and signal, and a body that is slurm/cpu_smoke.sbatch
    script = (exp_dir / f"{name}_sbatch.sh").read_text()
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(.*))?$", script, flags=re.M))
    assert directives["nodes"] == "2" and directives["ntasks-per-node"] == "1" and "gpus-per-node" not in directives
    assert directives["signal"] == "B:USR1@60" and "requeue" in directives
    assert f"exec bash {REPO_ROOT}/slurm/cpu_smoke.sbatch examples/tiny-cpu/dapo.yaml trainer.total_steps=1" in script
    # and that body ran: engine, 2-rank trainer, one step, checkpoint
    log = log_file.read_text(errors="replace")
    for needle in ("trainer TP=2 on 2 node(s) x 1 task(s)", "[step 1/1]", "trainer exited with 0"):
        assert needle in log, f"{needle!r} missing\n{report}"
    steps = [json.loads(line) for line in (tmp_path / "out" / "nemo" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1]
    assert (tmp_path / "out" / "nemo" / "checkpoints" / "iter_0000001" / "trainer_state.json").exists()
    history = sacct_history(env, job)
    assert history == [("COMPLETED", "0:0")], history
